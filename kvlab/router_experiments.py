"""Two models behind the router, one put to sleep and woken by a request: what notebook 03 runs, as kvlab calls.

- `start_router_fleet`: the engines of a fleet (kvcached, one budget group) and the router in front of them, in
  this process the way `kvlab serve` runs them, the router's event loop on a thread of its own (so a notebook
  can keep calling), and the engines' memory sampled into the run from then on.
- `alternating_bursts`: traffic through the router, a burst to one model at a time.
- `burst_then_sleep`, `sleep_model` / `wake_by_request`: a manual sleep (POST /sleep/model/...), mid-burst or
  of an idle model, and the request that wakes the model, with what the router measured (memory freed, wake
  time) beside what the probes saw.
- `traffic_table`, `sleep_table`, `sleep_wake_table`: the router's endpoints as tables.
"""
from __future__ import annotations

import asyncio
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Sequence

from kvlab.client import get_json, post_json
from kvlab.colocation_experiments import series_names
from kvlab.fleet import Fleet, SupervisedInstance
from kvlab.fleet_config import FleetConfig, parse_fleet_config
from kvlab.memory import (
    KV_RESERVED_BYTES,
    MEM_BYTES,
    HostTreeSource,
    KvcachedSource,
    NvmlSource,
)
from kvlab.results import MB, Run
from kvlab.router.app import Router, serve_app
from kvlab.router.runner import build_router, share_shm_dir

GIB = 1 << 30
ROUTER_READY_TIMEOUT_S = 30.0


@dataclass
class RouterFleet:
    """Running engines and the router in front of them; `url` is the one address clients use."""

    config: FleetConfig
    fleet: Fleet
    router: Router
    url: str
    names: list[str]
    group: str
    sampler: Any = None  # the run's MemorySampler over the engines
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _error: list[BaseException] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (openai.OpenAI(base_url=...))."""
        return self.url + "/v1"

    def instance(self, name: str) -> SupervisedInstance:
        for inst in self.fleet.instances:
            if inst.inst.name == name:
                return inst
        raise KeyError(f"no instance {name!r} in this fleet: {self.names}")

    def get(self, path: str) -> Any:
        return get_json(self.url + path, timeout=30)

    def post(self, path: str, payload: dict | None = None, timeout: float = 600) -> Any:
        return post_json(self.url + path, payload or {}, timeout=timeout)

    def check(self) -> None:
        """Raise if the router's thread died or an awake engine exited (with the engine's log diagnosis)."""
        from kvlab.router.sleep import AWAKE

        if self._error:
            raise RuntimeError(f"the router stopped: {self._error[0]!r}") from self._error[0]
        for inst in self.fleet.instances:
            # A model asleep at level stop (or on its way there or back) has no engine on purpose.
            if self.router.sleep.state(inst.inst.served_model_name) == AWAKE:
                inst.server.check()


def _quote(model: str) -> str:
    return urllib.parse.quote(model, safe="")


def fleet_config(models: Sequence[str], names: Sequence[str], *, kv_cache_gib: float, group: str,
                 sleep_levels: Sequence[str | None], idle_threshold_s: float, router_port: int,
                 max_model_len: int = 2048, engine_args: Sequence[str] = ()) -> FleetConfig:
    """A fleet of kvcached engines in one budget group, each serving its model under its series name.

    Auto-sleep is off: the notebook decides when a model sleeps, so the figures land in known phases; the idle
    threshold still decides which models the router lists as sleep candidates."""
    instances = []
    for model, name, level in zip(models, names, sleep_levels):
        args = ["--served-model-name", name, "--max-model-len", str(max_model_len),
                "--kv-cache-memory-bytes", str(int(kv_cache_gib * GIB)), *engine_args]
        engine_env: dict[str, str] = {}
        if level == "engine":  # vLLM's sleep mode is opt-in at start-up and behind its dev endpoints
            args.append("--enable-sleep-mode")
            engine_env["VLLM_SERVER_DEV_MODE"] = "1"
        instances.append({"name": name, "model": str(model), "sleep_level": level, "engine_env": engine_env,
                          "kvcached_env": {"ENABLE_KVCACHED": "true", "KVCACHED_IPC_NAME": group},
                          "engine_args": args})
    return parse_fleet_config({
        "router": {"router_port": router_port},
        "sleep_manager": {"auto_sleep_enabled": False, "idle_threshold_seconds": idle_threshold_s,
                          "min_sleep_duration": 0, "wakeup_on_request": True},
        "instances": instances})


def start_router_fleet(run: Run, models: Sequence[str], *, names: Sequence[str] | None = None,
                       kv_cache_gib: float, sleep_levels: Sequence[str | None] | str | None = "kv",
                       idle_threshold_s: float = 5.0, device: str = "cpu", engine_args: Sequence[str] = (),
                       interval_s: float = 0.05, progress: bool = True) -> RouterFleet:
    """Start one kvcached engine per model (one after another), then the router, then the memory sampler.

    `sleep_levels`: one level for all models or one per model (None: the router's default for the device)."""
    from kvlab.server import free_port

    names = list(names or series_names(models))
    levels = [sleep_levels] * len(names) if sleep_levels is None or isinstance(sleep_levels, str) \
        else list(sleep_levels)
    group = f"kvlab-router-{run.run_id}"
    engine_args = list(engine_args)
    if device == "cuda" and not any(a.startswith("--gpu-memory-utilization") for a in engine_args):
        # Each engine checks at start that this share of the GPU is free: split vLLM's default 0.9 between them.
        engine_args += ["--gpu-memory-utilization", f"{0.9 / len(names):.2f}"]
    config = fleet_config(models, names, kv_cache_gib=kv_cache_gib, group=group, sleep_levels=levels,
                          idle_threshold_s=idle_threshold_s, router_port=free_port(), engine_args=engine_args)
    fleet = Fleet(config, run.dir / "logs", progress=progress)
    with run.phase("startup", series="+".join(names)):
        fleet.start()
    try:
        share_shm_dir(config)
        router = build_router(config, fleet.backends())
        rf = RouterFleet(config=config, fleet=fleet, router=router, names=names, group=group,
                         url=f"http://{config.router.router_host}:{config.router.router_port}")
        _serve_in_thread(rf)
        rf.sampler = run.sampler(memory_sources(rf, device), interval_s=interval_s).start()
    except BaseException:
        fleet.stop()
        raise
    return rf


def _serve_in_thread(rf: RouterFleet) -> None:
    """The router's aiohttp app on its own event loop and thread, until stop_router_fleet."""
    ready = threading.Event()

    async def serve() -> None:
        rf._loop = asyncio.get_running_loop()
        rf._stop = asyncio.Event()
        ready.set()
        await serve_app(rf.router.build_app(rf.config.router.router_host), rf.config.router.router_host,
                        rf.config.router.router_port, rf._stop)

    def main() -> None:
        try:
            asyncio.run(serve())
        except BaseException as e:  # surfaced by check() and the readiness wait
            rf._error.append(e)
        finally:
            ready.set()

    rf._thread = threading.Thread(target=main, name="kvlab-router", daemon=True)
    rf._thread.start()
    ready.wait()
    deadline = time.monotonic() + ROUTER_READY_TIMEOUT_S
    while True:
        rf.check()
        try:
            rf.get("/health")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router at {rf.url} did not answer /health in {ROUTER_READY_TIMEOUT_S:.0f} s")
            time.sleep(0.1)


def memory_sources(rf: RouterFleet, device: str = "cpu") -> list[Any]:
    """Per engine, under its series name: its process tree's host memory and its kvcached pool's bytes (and
    NVML's per-process GPU memory on cuda). A restarted engine (sleep level stop) is followed: the probes
    look its processes up by the server, not by a PID fixed now."""
    sources: list[Any] = []
    for name in rf.names:
        server = rf.instance(name).server
        sources += [HostTreeSource(name, server, pss_interval_s=None), KvcachedSource(name, server=server)]
    if device == "cuda":
        sources.append(NvmlSource(series="gpu", processes={n: rf.instance(n).server for n in rf.names}))
    return sources


def stop_router_fleet(rf: RouterFleet) -> None:
    """Stop the memory sampler (the run keeps what it took), the router (which wakes its kv sleepers first)
    and every engine."""
    try:
        if rf.sampler is not None:
            rf.sampler.stop()
        if rf._loop is not None and rf._stop is not None and rf._thread is not None and rf._thread.is_alive():
            rf._loop.call_soon_threadsafe(rf._stop.set)
            rf._thread.join(timeout=60)
    finally:
        rf.fleet.stop()
        from kvcached.budget import cleanup

        for name in rf.names:  # records of engines that were stopped by signal
            cleanup(prefix=f"{name}-")


# ---- traffic ----------------------------------------------------------------------------------------------

def alternating_bursts(run: Run, rf: RouterFleet, *, rounds: int, burst_size: int, gap_s: float,
                       prompt_tokens: int, max_tokens: int, idle_s: float = 2.0, seed: int = 0,
                       progress: bool = True) -> list[Any]:
    """Round r (every `gap_s` seconds) is a burst of `burst_size` requests through the router to model r mod n.

    Prompts are fitted to `prompt_tokens` on each engine's own /tokenize (the router routes only the OpenAI
    endpoints), then sent to the router. Phases per series: idle (the idle memory level), load."""
    from kvlab.colocation_experiments import alternating_offsets
    from kvlab.prompts import SyntheticPrompts
    from kvlab.workload import Target, run_workload

    for name in rf.names:  # the first request pays one-off costs (compilation, caches)
        rf.post("/v1/completions", {"model": name, "prompt": "warm up", "max_tokens": 2})
    targets = []
    for i, name in enumerate(rf.names):
        offsets = alternating_offsets(len(rf.names), i, rounds=rounds, burst_size=burst_size, gap_s=gap_s)
        if not offsets:
            continue
        prompts = SyntheticPrompts(prompt_tokens).take(len(offsets), url=rf.instance(name).url, model=name,
                                                       seed=seed + i)
        targets.append(Target(url=rf.url, model=name, series=name, prompts=prompts, max_tokens=max_tokens,
                              arrival=offsets))
    with run.phase_for_each("idle", rf.names):
        _wait(idle_s, rf)
    with run.phase_for_each("load", rf.names):
        records = run_workload(targets, None, seed=seed, on_record=run.record, progress=progress)
    return list(records)



def _wait(seconds: float, rf: RouterFleet) -> None:
    """Sleep, checking the router and engines every half second so a crash ends the experiment with its log."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(0.5, left))
        rf.check()


# ---- the router's view --------------------------------------------------------------------------------------

def traffic_table(rf: RouterFleet) -> Any:
    """GET /traffic/stats as a DataFrame, one row per model."""
    import pandas as pd

    stats = rf.get("/traffic/stats")["traffic_stats"]
    df = pd.DataFrame.from_dict(stats, orient="index")
    df.index.name = "model"
    return df.drop(columns=["last_activity_time"], errors="ignore")


def sleep_table(rf: RouterFleet) -> Any:
    """GET /sleep/status per model: state, level (and why a level cannot act), idle seconds, candidate or not."""
    import pandas as pd

    status = rf.get("/sleep/status")
    traffic = rf.get("/traffic/stats")["traffic_stats"]
    rows = {m: {"state": s["state"], "level": s["level"], "level_unavailable": s["level_unavailable"],
                "idle_s": round(traffic.get(m, {}).get("idle_time_seconds", 0.0), 1),
                "sleep_candidate": m in status["sleep_candidates"]}
            for m, s in status["models"].items()}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "model"
    return df


def wait_until_candidate(run: Run, rf: RouterFleet, model: str, timeout_s: float = 120.0) -> float:
    """Wait (phase "idle" of `model`) until the router lists `model` as a sleep candidate: idle past the
    threshold. Returns the seconds waited."""
    started = time.monotonic()
    with run.phase("idle", series=model):
        while model not in rf.get("/sleep/candidates")["sleep_candidates"]:
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"{model!r} did not become a sleep candidate in {timeout_s:.0f} s: "
                                   f"{rf.get('/sleep/status')['models'][model]}")
            _wait(0.2, rf)
    return time.monotonic() - started


def _kv_records(rf: RouterFleet, model: str) -> list[Any]:
    from kvcached.budget import list_instances

    return [r for r in list_instances() if r.alive and r.name.startswith(f"{model}-") and r.group == rf.group]


def sleep_model(run: Run, rf: RouterFleet, model: str, *, asleep_s: float = 3.0) -> dict[str, Any]:
    """POST /sleep/model/<model> (phase "sleep"), then let it sleep `asleep_s` (phase "asleep").

    Returns what the router measured before and after (process-tree PSS, kvcached reserved bytes), what the
    run's probes saw, and, while it sleeps, the pool's reserved bytes beside the null page kvcached keeps
    mapped (one page per record)."""
    with run.phase("sleep", series=model):
        entry = rf.post(f"/sleep/model/{_quote(model)}")
    with run.phase("asleep", series=model):
        _wait(asleep_s, rf)
        records = _kv_records(rf, model)
    last = rf.get("/sleep/status")["models"][model]["last_sleep"]
    before, after = last["memory_before"], last["memory_after"]
    out = {"model": model, "level": entry["level"], "sleep_s": last["sleep_seconds"],
           "pss_before_mb": before["pss_bytes"] / MB, "pss_after_mb": after["pss_bytes"] / MB,
           "freed_pss_mb": last["freed_bytes"] / MB, "engine_pids_after": after["pids"]}
    if before.get("kv_reserved_bytes") is not None and after.get("kv_reserved_bytes") is not None:
        out.update(kv_reserved_before_mb=before["kv_reserved_bytes"] / MB,
                   kv_reserved_after_mb=after["kv_reserved_bytes"] / MB,
                   freed_kv_mb=last["freed_kv_bytes"] / MB)
    if records:  # a kv (or engine) sleeper: its records stay, with limit 0
        out.update(kv_records=len(records), kv_limit_bytes_asleep=sum(r.limit_bytes for r in records),
                   kv_reserved_bytes_asleep=sum(r.reserved_bytes for r in records),
                   null_page_bytes=sum(r.page_bytes for r in records))
    out.update(_probe_drop(run, model))
    return out


def burst_then_sleep(run: Run, rf: RouterFleet, model: str, *, burst_size: int, prompt_tokens: int,
                     max_tokens: int, asleep_s: float = 3.0, seed: int = 100) -> tuple[list[Any], dict[str, Any]]:
    """A burst to `model` through the router, and its sleep asked for while the burst is in flight.

    kvcached gives an engine's idle pages back by itself about half a second after its last request, so a
    model idle past any useful threshold holds only its null page, and a sleep then has nothing left to free.
    Asked for mid-burst, the sleep shows what it does with memory in use: the router closes the model's gate,
    waits for the requests in flight to finish (none is cut off), and releases their pages at once.
    Phases: load (the burst until the sleep is asked for), sleep, asleep. Returns (records, sleep_model's dict)."""
    from concurrent.futures import ThreadPoolExecutor

    from kvlab.clock import now
    from kvlab.prompts import SyntheticPrompts
    from kvlab.workload import Target, run_workload

    prompts = SyntheticPrompts(prompt_tokens).take(burst_size, url=rf.instance(model).url, model=model, seed=seed)
    target = Target(url=rf.url, model=model, series=model, prompts=prompts, max_tokens=max_tokens,
                    arrival=[0.0] * burst_size)
    with ThreadPoolExecutor(max_workers=1) as pool:
        with run.phase("load", series=model):
            burst = pool.submit(run_workload, target, None, on_record=run.record, progress=False)
            _wait_in_flight(rf, model, burst_size, burst)
        asked_at = now()
        slept = sleep_model(run, rf, model, asleep_s=asleep_s)
        records = burst.result()
    # The requests the sleep waited for: those still running when it was asked for.
    slept["requests_drained"] = sum(1 for r in records if r.end_s is not None and r.end_s > asked_at)
    return list(records), slept


def describe_sleep(slept: dict[str, Any]) -> str:
    """One line on what a sleep freed, from sleep_model's figures (kvcached's when the level kept the engine)."""
    head = f"{slept['model']} asleep (level {slept['level']})"
    if "kv_reserved_before_mb" in slept:
        null = f" (null page {slept['null_page_bytes'] / MB:.1f} MB)" if "null_page_bytes" in slept else ""
        head += (f": kvcached reserved {slept['kv_reserved_before_mb']:.1f} MB -> "
                 f"{slept['kv_reserved_after_mb']:.1f} MB{null}")
    return head + f"; process-tree PSS {slept['pss_before_mb']:.0f} MB -> {slept['pss_after_mb']:.0f} MB"


def _wait_in_flight(rf: RouterFleet, model: str, count: int, burst: Any, timeout_s: float = 120.0) -> None:
    """Until the router holds `count` requests of `model` in flight (or the burst is over already)."""
    deadline = time.monotonic() + timeout_s
    while not burst.done():
        if rf.get("/sleep/status")["models"][model]["in_flight"] >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} requests of {model!r} were not in flight after {timeout_s:.0f} s")
        rf.check()
        time.sleep(0.02)


def _probe_drop(run: Run, model: str) -> dict[str, float]:
    """What the memory probes saw (MB): the most the model held from just before the sleep until it was done
    (the requests it waited for included), and the median while asleep."""
    memory = run.memory()
    sleep = next(p for p in reversed(run.phases) if p.name == "sleep" and p.series == model)
    asleep = next(p for p in reversed(run.phases) if p.name == "asleep" and p.series == model)
    out: dict[str, float] = {}
    for metric, key in ((KV_RESERVED_BYTES, "probe_kv_reserved"), (MEM_BYTES, "probe_mem")):
        df = memory[(memory.series == model) & (memory.metric == metric)].sort_values("t_s")
        pre = df[df.t_s <= sleep.start_s].tail(1)
        held = df[df.t_s.between(sleep.start_s, sleep.end_s or float("inf"))]
        during = df[df.t_s.between(asleep.start_s, asleep.end_s or float("inf"))]
        before = list(pre.value) + list(held.value)
        if before and len(during):
            out[f"{key}_before_mb"] = float(max(before)) / MB
            out[f"{key}_asleep_mb"] = float(during.value.median()) / MB
    return out


def wake_by_request(run: Run, rf: RouterFleet, model: str, *, prompt_tokens: int = 32, max_tokens: int = 8,
                    after_s: float = 2.0) -> dict[str, Any]:
    """One request to the sleeping model through the router (phase "wake"): the router wakes the model, then
    serves it. Returns the request's figures and the router's wake time; then `after_s` awake (phase "awake")."""
    from kvlab.workload import Target, run_workload

    target = Target(url=rf.url, model=model, series=model, prompts=["wake up " * max(1, prompt_tokens // 3)],
                    max_tokens=max_tokens, arrival=[0.0])
    with run.phase("wake", series=model):
        rec = run_workload(target, None, on_record=run.record, progress=False)[0]
    wake = rf.get("/sleep/status")["models"][model]["last_wake"] or {}
    with run.phase("awake", series=model):
        _wait(after_s, rf)
    return {"model": model, "request_ok": rec.ok, "error": rec.error, "wake_s": wake.get("wake_seconds"),
            "wake_reason": wake.get("reason"), "request_ttft_s": rec.ttft_s, "request_latency_s": rec.e2e_s,
            "state_now": rf.get("/sleep/status")["models"][model]["state"]}


def sleep_wake_table(*rounds: tuple[dict[str, Any], dict[str, Any]]) -> Any:
    """One row per (sleep, wake) pair: memory freed (router and probes) and the wake-on-request latency."""
    import pandas as pd

    cols = ["level", "freed_pss_mb", "freed_kv_mb", "kv_reserved_before_mb", "kv_reserved_after_mb",
            "probe_kv_reserved_before_mb", "probe_kv_reserved_asleep_mb", "probe_mem_before_mb", "probe_mem_asleep_mb",
            "wake_s", "request_ttft_s", "request_latency_s", "request_ok"]
    rows = {s["model"] + "/" + s["level"]: {**s, **w} for s, w in rounds}
    df = pd.DataFrame.from_dict(rows, orient="index")
    return df[[c for c in cols if c in df]].round(3)


__all__ = ["RouterFleet", "alternating_bursts", "burst_then_sleep", "describe_sleep", "fleet_config", "memory_sources", "sleep_model",
           "sleep_table", "sleep_wake_table", "start_router_fleet", "stop_router_fleet", "traffic_table",
           "wait_until_candidate", "wake_by_request"]

"""Two models behind the router, one put to sleep and woken by a request: what notebook 03 runs, as kvlab calls.

- `alternating_bursts`: traffic through the router, a burst to one model at a time.
- `burst_then_sleep`, `sleep_model` / `wake_by_request`: a manual sleep (POST /sleep/model/...), mid-burst or
  of an idle model, and the request that wakes the model, with what the router measured (memory freed, wake
  time) beside what the probes saw.
- `traffic_table`, `sleep_table`, `sleep_wake_table`: the router's endpoints as tables.
The engines and the router themselves come from `kvlab.experiments.router_fleet`.
"""
from __future__ import annotations

import time
from typing import Any

from kvlab.experiments.common import alternating_offsets, wait_alive
from kvlab.experiments.router_fleet import RouterFleet, quote_model
from kvlab.probes import GPU_PROCESS_BYTES, KV_RESERVED_BYTES, MEM_BYTES
from kvlab.runs import MB, Run


def alternating_bursts(run: Run, rf: RouterFleet, *, rounds: int, burst_size: int, gap_s: float,
                       prompt_tokens: int, max_tokens: int, idle_s: float = 2.0, seed: int = 0,
                       progress: bool = True) -> list[Any]:
    """Round r (every `gap_s` seconds) is a burst of `burst_size` requests through the router to model r mod n.

    Prompts are fitted to `prompt_tokens` on each engine's own /tokenize (the router routes only the OpenAI
    endpoints), then sent to the router. Phases per series: idle (the idle memory level), load."""
    from kvlab.load.prompts import SyntheticPrompts
    from kvlab.load.workload import Target, run_workload

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
        wait_alive(idle_s, rf)
    with run.phase_for_each("load", rf.names):
        records = run_workload(targets, None, seed=seed, on_record=run.record, progress=progress)
    return list(records)


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
            wait_alive(0.2, rf)
    return time.monotonic() - started


def _kv_records(rf: RouterFleet, model: str) -> list[Any]:
    from kvcached.budget import find_instance

    try:
        info = find_instance(rf.instance(model).server.kvcached_name)
    except KeyError:
        return []
    return [info] if info.alive and info.group == rf.group else []


def sleep_model(run: Run, rf: RouterFleet, model: str, *, asleep_s: float = 3.0) -> dict[str, Any]:
    """POST /sleep/model/<model> (phase "sleep"), then let it sleep `asleep_s` (phase "asleep").

    Returns what the router measured before and after (process-tree PSS, kvcached reserved bytes), what the
    run's probes saw, and, while it sleeps, the pool's reserved bytes beside the null page kvcached keeps
    mapped (one page per record)."""
    with run.phase("sleep", series=model):
        entry = rf.post(f"/sleep/model/{quote_model(model)}")
    with run.phase("asleep", series=model):
        wait_alive(asleep_s, rf)
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
        out.update(kv_records=len(records), kv_limit_bytes_asleep=sum(r.effective_limit_bytes for r in records),
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
    from kvlab.load.prompts import SyntheticPrompts
    from kvlab.load.workload import Target, run_workload

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
    # Host memory always; a server's GPU memory too where NVML sampled it (on a GPU the KV pool lives there).
    for metric, key in ((KV_RESERVED_BYTES, "probe_kv_reserved"), (MEM_BYTES, "probe_mem"),
                        (GPU_PROCESS_BYTES, "probe_gpu")):
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
    from kvlab.load.workload import Target, run_workload

    target = Target(url=rf.url, model=model, series=model, prompts=["wake up " * max(1, prompt_tokens // 3)],
                    max_tokens=max_tokens, arrival=[0.0])
    with run.phase("wake", series=model):
        rec = run_workload(target, None, on_record=run.record, progress=False)[0]
    wake = rf.get("/sleep/status")["models"][model]["last_wake"] or {}
    with run.phase("awake", series=model):
        wait_alive(after_s, rf)
    return {"model": model, "request_ok": rec.ok, "error": rec.error, "wake_s": wake.get("wake_seconds"),
            "wake_reason": wake.get("reason"), "request_ttft_s": rec.ttft_s, "request_latency_s": rec.e2e_s,
            "state_now": rf.get("/sleep/status")["models"][model]["state"]}


def sleep_wake_table(*rounds: tuple[dict[str, Any], dict[str, Any]]) -> Any:
    """One row per (sleep, wake) pair: memory freed (router and probes) and the wake-on-request latency."""
    import pandas as pd

    cols = ["level", "freed_pss_mb", "freed_kv_mb", "kv_reserved_before_mb", "kv_reserved_after_mb",
            "probe_kv_reserved_before_mb", "probe_kv_reserved_asleep_mb", "probe_mem_before_mb", "probe_mem_asleep_mb",
            "probe_gpu_before_mb", "probe_gpu_asleep_mb", "wake_s", "request_ttft_s", "request_latency_s", "request_ok"]
    rows = {s["model"] + "/" + s["level"]: {**s, **w} for s, w in rounds}
    df = pd.DataFrame.from_dict(rows, orient="index")
    return df[[c for c in cols if c in df]].round(3)

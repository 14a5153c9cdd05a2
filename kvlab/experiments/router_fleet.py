"""Engines and the router in front of them, run in this process the way `kvlab serve` runs them: the router's
event loop on a thread of its own (so a notebook can keep calling), the engines' memory sampled into the run.
"""
from __future__ import annotations

import asyncio
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Sequence

from kvlab.engines.fleet import Fleet, SupervisedEngine, use_fleet_shm_dir
from kvlab.engines.fleet_config import FleetConfig, parse_fleet_config
from kvlab.experiments.common import GIB, gpu_share_args, series_names
from kvlab.load.client import get_json, post_json
from kvlab.probes import HostTreeSource, KvcachedSource, NvmlSource
from kvlab.router.app import Router, serve_app
from kvlab.runs import Run

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

    def instance(self, name: str) -> SupervisedEngine:
        for inst in self.fleet.engines:
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
        for inst in self.fleet.engines:
            # A model asleep at level stop (or on its way there or back) has no engine on purpose.
            if self.router.sleep.state(inst.inst.served_model_name) == AWAKE:
                inst.server.check()


def quote_model(model: str) -> str:
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
    from kvlab.engines.ports import free_port

    names = list(names or series_names(models))
    levels = [sleep_levels] * len(names) if sleep_levels is None or isinstance(sleep_levels, str) \
        else list(sleep_levels)
    group = f"kvlab-router-{run.run_id}"
    engine_args = gpu_share_args(device, len(names), engine_args)
    config = fleet_config(models, names, kv_cache_gib=kv_cache_gib, group=group, sleep_levels=levels,
                          idle_threshold_s=idle_threshold_s, router_port=free_port(), engine_args=engine_args)
    fleet = Fleet(config, run.dir / "logs", progress=progress)
    with run.phase("startup", series="+".join(names)):
        fleet.start()
    try:
        use_fleet_shm_dir(config)
        router = fleet.router()
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
                raise RuntimeError(f"the router at {rf.url} did not answer /health in "
                                   f"{ROUTER_READY_TIMEOUT_S:.0f} s") from None
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
        from kvcached.budget import reap

        reap()  # records of engines that were stopped by signal

"""The sleep state of each model, the gate every request passes, manual and automatic sleep."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import aiohttp

from kvlab.probes.nvml import gpu_present
from kvlab.router.backends import Backend
from kvlab.router.settings import SleepSettings
from kvlab.router.sleep.levels import SleepError, SleepLevel, default_sleep_level, make_level
from kvlab.router.sleep.memory import measure_memory
from kvlab.router.traffic import TrafficMonitor

log = logging.getLogger("kvlab.router.sleep")

AWAKE, FALLING_ASLEEP, ASLEEP, WAKING = "awake", "falling_asleep", "asleep", "waking"


class ModelAsleep(RuntimeError):
    """A request for a sleeping model while wake-on-request is off."""


@dataclass
class _ModelSleep:
    level: SleepLevel
    state: str = AWAKE
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    in_flight: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    sleep_start_wall: float | None = None
    sleep_start_mono: float | None = None
    manual: bool = False
    woke_mono: float | None = None
    last_sleep: dict | None = None
    last_wake: dict | None = None

    def __post_init__(self) -> None:
        self.drained.set()


class SleepManager:
    """Sleep state per model, the request gate, manual and automatic sleep. Lives on the router's event loop."""

    def __init__(self, backends: dict[str, Backend], traffic: TrafficMonitor, settings: SleepSettings,
                 levels: dict[str, SleepLevel] | None = None,
                 session: Callable[[], aiohttp.ClientSession] | None = None, gpu: bool | None = None,
                 measure: Callable[[Backend, str | None], dict] = measure_memory,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backends = backends
        self.traffic = traffic
        self.settings = settings
        self.gpu = gpu_present() if gpu is None else gpu
        self._measure = measure
        self._clock = clock
        levels = dict(levels or {})
        for model, backend in backends.items():
            if model not in levels:
                if session is None:
                    raise ValueError("SleepManager needs a session factory to build the default levels")
                name = backend.sleep_level or default_sleep_level(backend, self.gpu)
                levels[model] = make_level(name, backend, session, self.gpu)
        self._states = {model: _ModelSleep(level=levels[model]) for model in backends}
        self._task: asyncio.Task | None = None

    def set_level(self, model: str, level: SleepLevel) -> None:
        """Change how a model sleeps (benchmarks compare levels on one engine); only while it is awake."""
        st = self._states[model]
        if st.state != AWAKE:
            raise SleepError(f"{model!r} is {st.state}: wake it before changing its sleep level")
        st.level = level

    # ---- the request gate ------------------------------------------------------------------------------
    def state(self, model: str) -> str:
        return self._states[model].state

    def is_sleeping(self, model: str) -> bool:
        return self._states[model].state != AWAKE

    @contextlib.asynccontextmanager
    async def admit(self, model: str) -> AsyncIterator[None]:
        """Hold a request until its model is awake (waking it if allowed); count it in flight meanwhile."""
        st = self._states[model]
        while st.state != AWAKE:
            if not self.settings.wakeup_on_request:
                raise ModelAsleep(f"model {model!r} is asleep and wake-on-request is off: "
                                  f"POST /wake/model/{model.replace('/', '%2F')} first")
            await self.wake(model, reason="request")
        st.in_flight += 1
        st.drained.clear()
        try:
            yield
        finally:
            st.in_flight -= 1
            if st.in_flight == 0:
                st.drained.set()

    # ---- sleep and wake --------------------------------------------------------------------------------
    async def sleep(self, model: str, *, manual: bool = True) -> dict:
        st = self._states[model]
        reason = st.level.unavailable_reason()
        if reason:
            raise SleepError(reason)
        async with st.lock:
            if st.state == ASLEEP:
                return self._sleeping_entry(model)
            st.state = FALLING_ASLEEP
            try:
                await asyncio.wait_for(st.drained.wait(), timeout=self.settings.drain_timeout_seconds)
            except asyncio.TimeoutError:
                st.state = AWAKE
                raise SleepError(f"{model!r} still has {st.in_flight} request(s) in flight after "
                                 f"{self.settings.drain_timeout_seconds:g} s: try again when it is idle") from None
            backend = self.backends[model]
            try:
                kv_instance = await st.level.kv_instance()
                before = await asyncio.to_thread(self._measure, backend, kv_instance)
                t0 = self._clock()
                await st.level.sleep()
                sleep_s = self._clock() - t0
                after = await asyncio.to_thread(self._measure, backend, kv_instance)
            except BaseException:
                with contextlib.suppress(Exception):
                    await st.level.wake()  # undo a half-done sleep (a limit at 0) before reporting
                st.state = AWAKE
                raise
            st.state = ASLEEP
            st.manual = manual
            st.sleep_start_wall = time.time()
            st.sleep_start_mono = self._clock()
            st.last_sleep = {"level": st.level.name, "sleep_seconds": sleep_s, "memory_before": before,
                             "memory_after": after, **_freed(before, after)}
            log.info("%s asleep (level %s): freed %.1f MB PSS", model, st.level.name,
                     st.last_sleep["freed_bytes"] / 1e6)
            return self._sleeping_entry(model)

    async def wake(self, model: str, *, reason: str = "manual") -> dict:
        st = self._states[model]
        async with st.lock:
            if st.state == AWAKE:
                return {"model": model, "state": AWAKE, "woken": False}
            st.state = WAKING
            t0 = self._clock()
            try:
                await st.level.wake()
            except BaseException as e:
                st.state = ASLEEP
                if isinstance(e, Exception):
                    raise SleepError(f"waking {model!r} (level {st.level.name}) failed: {e}") from e
                raise
            wake_s = self._clock() - t0
            slept = self._clock() - (st.sleep_start_mono or t0)
            st.state = AWAKE
            st.woke_mono = self._clock()
            st.last_wake = {"level": st.level.name, "wake_seconds": wake_s, "slept_seconds": slept,
                            "reason": reason, "time": time.time()}
            st.sleep_start_wall = st.sleep_start_mono = None
            log.info("%s awake in %.3f s (%s)", model, wake_s, reason)
            return {"model": model, "state": AWAKE, "woken": True, **st.last_wake}

    # ---- automatic sleep -------------------------------------------------------------------------------
    def candidates(self) -> list[str]:
        """Awake models idle past the threshold that a level can put to sleep, and not just woken."""
        now = self._clock()
        out = []
        for model, st in self._states.items():
            if st.state != AWAKE or st.in_flight or st.level.unavailable_reason():
                continue
            if self.traffic.idle_seconds(model) < self.settings.idle_threshold_seconds:
                continue
            if st.woke_mono is not None and now - st.woke_mono < self.settings.min_sleep_duration:
                continue
            out.append(model)
        return out

    async def check_once(self) -> list[str]:
        """One auto-sleep pass; returns the models put to sleep."""
        slept = []
        for model in self.candidates():
            try:
                await self.sleep(model, manual=False)
                slept.append(model)
            except SleepError as e:
                log.warning("auto-sleep of %s skipped: %s", model, e)
        return slept

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_interval_seconds)
            if self.settings.auto_sleep_enabled:
                try:
                    await self.check_once()
                except Exception:
                    log.exception("auto-sleep pass failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="kvlab-auto-sleep")

    async def close(self) -> None:
        """Stop the auto-sleep task and wake every sleeping model, so no engine is left with a zero limit."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for model, st in self._states.items():
            if st.state != AWAKE and st.level.name != "stop":
                with contextlib.suppress(Exception):
                    await self.wake(model, reason="router shutdown")

    # ---- reports ---------------------------------------------------------------------------------------
    def _sleeping_entry(self, model: str) -> dict:
        st = self._states[model]
        entry = {"sleep_start_time": st.sleep_start_wall,
                 "sleep_duration": self._clock() - st.sleep_start_mono if st.sleep_start_mono else 0.0,
                 "manual_sleep": st.manual, "level": st.level.name, "state": st.state}
        if st.last_sleep:
            entry.update({k: st.last_sleep[k] for k in ("freed_bytes", "freed_rss_bytes", "freed_kv_bytes",
                                                        "freed_gpu_bytes", "sleep_seconds") if k in st.last_sleep})
        return entry

    def status(self) -> dict:
        """The seed's shape, plus per-model levels, what the last sleep freed and how long the last wake took."""
        models = {}
        for model, st in self._states.items():
            models[model] = {"state": st.state, "level": st.level.name,
                             "level_unavailable": st.level.unavailable_reason(),
                             "in_flight": st.in_flight, "last_sleep": st.last_sleep, "last_wake": st.last_wake}
        return {
            "sleeping_models": {m: self._sleeping_entry(m) for m, st in self._states.items()
                                if st.state in (ASLEEP, FALLING_ASLEEP, WAKING)},
            "sleep_candidates": self.candidates(),
            "auto_sleep_enabled": self.settings.auto_sleep_enabled,
            "idle_threshold_seconds": self.settings.idle_threshold_seconds,
            "wake_on_request": self.settings.wakeup_on_request,
            "min_sleep_duration": self.settings.min_sleep_duration,
            "models": models,
        }


def _freed(before: dict, after: dict) -> dict:
    out = {"freed_bytes": before["pss_bytes"] - after["pss_bytes"],
           "freed_rss_bytes": before["rss_bytes"] - after["rss_bytes"]}
    if before.get("kv_reserved_bytes") is not None and after.get("kv_reserved_bytes") is not None:
        out["freed_kv_bytes"] = before["kv_reserved_bytes"] - after["kv_reserved_bytes"]
    if "gpu_bytes" in before and "gpu_bytes" in after:
        out["freed_gpu_bytes"] = before["gpu_bytes"] - after["gpu_bytes"]
    return out

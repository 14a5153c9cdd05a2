"""Put idle models to sleep for real, and wake them when a request comes.

Three levels, from light to deep:
- `kv`: set the instance's kvcached limit to 0. Its allocator gives back every idle KV page (~1 s later) and
  admits nothing new; the router holds the model's requests meanwhile. Wake restores the limit: milliseconds.
- `engine`: vLLM's sleep mode (POST /sleep?level=1 offloads weights and drops the KV cache; POST /wake_up),
  plus the kvcached limit 0 when the engine runs kvcached. GPU only; the engine must run with
  --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1.
- `stop`: stop the engine's processes, start them again on wake. Frees everything; wake costs a start-up.
  Needs `kvlab serve`, which owns the processes.

Each sleep records what it freed (process-tree PSS/RSS, kvcached reserved bytes, GPU bytes when there is a GPU)
and each wake how long it took; /sleep/status shows both.

Requests go through `admit(model)`: while a model sleeps (or falls asleep), a request either wakes it and
waits (wakeup_on_request) or is refused with 503. A sleep first closes the gate and waits for the model's
requests in flight to finish, so no request is cut off by its engine losing memory under it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Protocol

import aiohttp

from kvlab.fleet_config import SleepSettings
from kvlab.router.backends import Backend, pids_listening_on
from kvlab.router.traffic import TrafficMonitor

log = logging.getLogger("kvlab.router.sleep")

AWAKE, FALLING_ASLEEP, ASLEEP, WAKING = "awake", "falling_asleep", "asleep", "waking"
KV_RELEASE_TIMEOUT_S = 15.0
KV_RELEASE_STABLE_S = 2.0


class SleepError(RuntimeError):
    """A sleep or wake that could not be done; the message says why and what to do."""


class ModelAsleep(RuntimeError):
    """A request for a sleeping model while wake-on-request is off."""


def gpu_present() -> bool:
    """A GPU machine without importing torch (the router stays light): the NVIDIA driver's device nodes."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def default_sleep_level(backend: Backend, gpu: bool) -> str:
    """The deepest level that wakes fast: vLLM sleep mode where it is on, else kv where kvcached runs, else stop."""
    if gpu and backend.sleep_mode and backend.engine == "vllm":
        return "engine"
    if backend.kvcached:
        return "kv"
    return "stop"


# ---- memory probes ----------------------------------------------------------------------------------------

def _smaps_rollup(pid: int) -> tuple[int, int]:
    """(rss, pss) bytes of one process; (0, 0) when it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, pss


def _gpu_bytes(pids: list[int]) -> int | None:
    """GPU memory held by these processes (NVML); None without a GPU or NVML."""
    if not pids or not gpu_present():
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        wanted, total = set(pids), 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in wanted and proc.usedGpuMemory:
                    total += proc.usedGpuMemory
        return total
    finally:
        pynvml.nvmlShutdown()


def kv_records(instance_prefix: str) -> list:
    """kvcached budget records of one engine (its scheduler and workers each publish one)."""
    from kvcached.budget import list_instances

    return [r for r in list_instances() if r.alive and r.name.startswith(instance_prefix)]


def measure_memory(backend: Backend, kv_instance: str | None) -> dict:
    """Process-tree RSS/PSS, kvcached reserved bytes and GPU bytes of one backend, now (blocking: ~50 ms)."""
    if backend.process is not None:
        pids = backend.process.pids()
    else:
        port = int(backend.url.rsplit(":", 1)[1].split("/")[0])
        pids = pids_listening_on(port)
    rss = pss = 0
    for pid in pids:
        r, p = _smaps_rollup(pid)
        rss += r
        pss += p
    out = {"pids": len(pids), "rss_bytes": rss, "pss_bytes": pss,
           "kv_reserved_bytes": sum(r.reserved_bytes for r in kv_records(kv_instance)) if kv_instance else None}
    gpu = _gpu_bytes(pids)
    if gpu is not None:
        out["gpu_bytes"] = gpu
    return out


# ---- levels -----------------------------------------------------------------------------------------------

class SleepLevel(Protocol):
    name: str

    def unavailable_reason(self) -> str | None:
        """None when this level can act on its backend, else why not and what to do."""

    async def kv_instance(self) -> str | None:
        """The engine's kvcached instance name (prefix of its budget records), None without kvcached."""

    async def sleep(self) -> None: ...

    async def wake(self) -> None: ...


class _KVLimit:
    """Limit 0 on every budget record of one engine, and the limits to put back."""

    def __init__(self, backend: Backend, session: Callable[[], aiohttp.ClientSession]) -> None:
        self.backend = backend
        self._session = session
        self._instance: str | None = None
        self._saved: dict[str, int] = {}

    async def instance(self) -> str:
        if self._instance:
            return self._instance
        url = self.backend.url + "/kvcached/stats"
        try:
            async with self._session().get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                stats = await resp.json(content_type=None) if resp.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            raise SleepError(f"cannot read {url} ({e}): is {self.backend.name} up?") from None
        if not stats.get("instance") or not stats.get("enabled", True):
            raise SleepError(f"{self.backend.name} reports no kvcached instance at {url}: start it with "
                             "ENABLE_KVCACHED=true and VLLM_PLUGINS=kvcached,kvcached_stats, or use sleep_level stop")
        self._instance = str(stats["instance"])
        return self._instance

    async def release(self) -> None:
        from kvcached import budget

        records = kv_records(await self.instance())
        if not records:
            raise SleepError(f"no live kvcached record starts with {self._instance!r}: is KVCACHED_SHM_DIR the "
                             "same for the router and the engine? (`kvctl list` shows the records)")
        for rec in records:
            self._saved.setdefault(rec.name, rec.limit_bytes)
            budget.set_limit(rec.name, 0)
        await self._wait_released()

    async def _wait_released(self) -> None:
        """Until the engine has given its idle pages back (reserved stops falling), so the figure is the freed one."""
        deadline = time.monotonic() + KV_RELEASE_TIMEOUT_S
        last, stable_since = None, time.monotonic()
        while time.monotonic() < deadline:
            records = kv_records(self._instance or "")
            reserved = sum(r.reserved_bytes for r in records)
            floor = max((r.page_bytes for r in records), default=0)  # a null page may stay mapped
            if reserved <= floor:
                return
            if reserved != last:
                last, stable_since = reserved, time.monotonic()
            elif time.monotonic() - stable_since >= KV_RELEASE_STABLE_S:
                return
            await asyncio.sleep(0.1)

    def restore(self) -> None:
        from kvcached import budget

        for name, limit in self._saved.items():
            try:
                budget.set_limit(name, limit)
            except KeyError:
                pass  # the engine restarted: its new record has its own limit
        self._saved.clear()


class KVLevel:
    name = "kv"

    def __init__(self, backend: Backend, session: Callable[[], aiohttp.ClientSession]) -> None:
        self.backend = backend
        self._kv = _KVLimit(backend, session)

    def unavailable_reason(self) -> str | None:
        if not self.backend.kvcached:
            return (f"{self.backend.name} does not run kvcached: set ENABLE_KVCACHED=true in its kvcached_env, "
                    "or use sleep_level stop")
        return None

    async def kv_instance(self) -> str | None:
        return await self._kv.instance()

    async def sleep(self) -> None:
        await self._kv.release()

    async def wake(self) -> None:
        self._kv.restore()


class EngineLevel:
    name = "engine"

    def __init__(self, backend: Backend, session: Callable[[], aiohttp.ClientSession], gpu: bool) -> None:
        self.backend = backend
        self._session = session
        self._gpu = gpu
        self._kv = _KVLimit(backend, session) if backend.kvcached else None

    def unavailable_reason(self) -> str | None:
        if self.backend.engine != "vllm":
            return f"level engine needs vLLM's sleep mode; {self.backend.name} runs {self.backend.engine}"
        if not self._gpu:
            return "level engine needs a GPU (vLLM's sleep mode offloads GPU memory); use kv or stop on CPU"
        if not self.backend.sleep_mode:
            return (f"{self.backend.name} was not started with --enable-sleep-mode: add it to engine_args and "
                    "VLLM_SERVER_DEV_MODE=1 to engine_env")
        return None

    async def kv_instance(self) -> str | None:
        return await self._kv.instance() if self._kv else None

    async def _post(self, path: str) -> None:
        url = self.backend.url + path
        async with self._session().post(url, timeout=aiohttp.ClientTimeout(total=300)) as resp:
            if resp.status >= 400:
                text = (await resp.text())[:300]
                raise SleepError(f"POST {url} answered {resp.status}: {text} (is VLLM_SERVER_DEV_MODE=1 set?)")

    async def _is_sleeping(self) -> bool:
        async with self._session().get(self.backend.url + "/is_sleeping") as resp:
            return bool((await resp.json(content_type=None)).get("is_sleeping"))

    async def sleep(self) -> None:
        await self._post("/sleep?level=1")
        if self._kv:
            await self._kv.release()

    async def wake(self) -> None:
        if self._kv:
            self._kv.restore()
        await self._post("/wake_up")
        deadline = time.monotonic() + 300
        while await self._is_sleeping():
            if time.monotonic() > deadline:
                raise SleepError(f"{self.backend.name} still sleeping 300 s after /wake_up: see its log")
            await asyncio.sleep(0.05)


class StopLevel:
    name = "stop"

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def unavailable_reason(self) -> str | None:
        if self.backend.process is None:
            return ("level stop needs process control: run the engines with `kvlab serve` (the router alone "
                    "cannot restart engines it did not start)")
        return None

    async def kv_instance(self) -> str | None:
        return None  # a stopped engine frees its whole process tree; the tree's PSS is the figure

    async def sleep(self) -> None:
        assert self.backend.process is not None
        await asyncio.to_thread(self.backend.process.stop)

    async def wake(self) -> None:
        assert self.backend.process is not None
        await asyncio.to_thread(self.backend.process.start)


def make_level(name: str, backend: Backend, session: Callable[[], aiohttp.ClientSession], gpu: bool) -> SleepLevel:
    if name == "kv":
        return KVLevel(backend, session)
    if name == "engine":
        return EngineLevel(backend, session, gpu)
    if name == "stop":
        return StopLevel(backend)
    raise ValueError(f"unknown sleep level {name!r}: use kv, engine or stop")


# ---- the manager ------------------------------------------------------------------------------------------

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

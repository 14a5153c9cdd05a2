"""Sleep levels, from light to deep: `kv` (kvcached limit 0), `engine` (vLLM's sleep mode), `stop` (processes
stopped). Each one says whether it can act on its engine, sleeps it and wakes it; the limits go through kvcached's
admin API."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Protocol

import aiohttp

from kvlab.router.backends import Backend
from kvlab.router.sleep.memory import kv_records

KV_RELEASE_TIMEOUT_S = 15.0
KV_RELEASE_STABLE_S = 2.0
# A kv sleep's lease: renewed every third of it while the model sleeps, so a dead router's sleep ends this long
# after its last renewal (sooner: kvcached drops a lease as soon as its holder's process is gone).
KV_LEASE_S = 30.0

log = logging.getLogger("kvlab.router.sleep")


class SleepError(RuntimeError):
    """A sleep or wake that could not be done; the message says why and what to do."""


def default_sleep_level(backend: Backend, gpu: bool) -> str:
    """The deepest level that wakes fast: vLLM sleep mode where it is on, else kv where kvcached runs, else stop."""
    if gpu and backend.sleep_mode and backend.engine == "vllm":
        return "engine"
    if backend.kvcached:
        return "kv"
    return "stop"


class SleepLevel(Protocol):
    name: str

    def unavailable_reason(self) -> str | None:
        """None when this level can act on its backend, else why not and what to do."""

    async def kv_instance(self) -> str | None:
        """The engine's kvcached instance name (prefix of its budget records), None without kvcached."""

    async def sleep(self) -> None: ...

    async def wake(self) -> None: ...


class _KVLimit:
    """A lease holding one engine's kvcached limit at 0 while it sleeps (kvcached's admin API).

    The lease is renewed while the model sleeps; if the router dies, it runs out and the engine gets its own limit
    back by itself. Waking drops the lease: nothing was saved, so nothing has to be restored, and a limit changed
    meanwhile (`kvctl limit`) is the one that binds after."""

    def __init__(self, backend: Backend, session: Callable[[], aiohttp.ClientSession],
                 lease_s: float = KV_LEASE_S) -> None:
        self.backend = backend
        self._session = session
        self._lease_s = lease_s
        self._instance: str | None = None
        self._lease: Any = None
        self._renewer: asyncio.Task | None = None

    async def instance(self) -> str:
        """The engine's exact kvcached name, as its /kvcached/stats reports it."""
        if self._instance:
            return self._instance
        url = self.backend.url + "/kvcached/stats"
        try:
            async with self._session().get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                stats = await resp.json(content_type=None) if resp.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            raise SleepError(f"cannot read {url} ({e}): is {self.backend.name} up?") from None
        name = stats.get("instance") if isinstance(stats, dict) else None
        if not isinstance(name, str) or not name or not stats.get("enabled", True):
            raise SleepError(f"{self.backend.name} reports no kvcached instance at {url}: start it with "
                             "ENABLE_KVCACHED=true and VLLM_PLUGINS=kvcached,kvcached_stats, or use sleep_level stop")
        self._instance = name
        return self._instance

    async def release(self) -> None:
        from kvcached import budget

        name = await self.instance()
        try:
            self._lease = budget.lease_limit(name, 0, ttl_s=self._lease_s)
        except KeyError:
            raise SleepError(f"no kvcached record named {name!r}: is KVCACHED_SHM_DIR the same for the router and "
                             "the engine? (`kvctl list` shows the records)") from None
        except (RuntimeError, ValueError) as e:  # another holder's lease, or a record nobody can read
            raise SleepError(f"cannot lower {name!r}'s limit: {e}") from None
        self._renewer = asyncio.get_running_loop().create_task(self._renew(), name=f"kvlab-lease-{name}")
        await self._wait_released()

    async def _renew(self) -> None:
        from kvcached.budget import LeaseLost

        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                await asyncio.to_thread(self._lease.renew)
            except (LeaseLost, OSError, ValueError) as e:  # the engine restarted or its record went: nothing held
                log.warning("kv sleep of %s: lease not renewed (%s)", self.backend.name, e)
                return

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
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None


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

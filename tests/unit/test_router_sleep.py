"""The `kv` sleep level on a real kvcached budget record: limit 0 on sleep, the old limit back on wake, freed bytes
measured. The engine's part (giving pages back when its limit drops) is played by a fake engine loop here;
the server tier checks it against real vLLM."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from kvcached.budget import BudgetRecord, find_instance
from kvlab.bench.noop_server import start_noop_server
from kvlab.engines.ports import free_port
from kvlab.router.backends import Backend
from kvlab.router.settings import SleepSettings
from kvlab.router.sleep import KVLevel, SleepManager, StopLevel, default_sleep_level, measure_memory
from kvlab.router.traffic import TrafficMonitor

MiB = 1 << 20


async def fake_engine_gives_pages_back(record: BudgetRecord, stop: asyncio.Event) -> None:
    """Fake engine: what kvcached's allocator does when its limit falls below what it holds."""
    while not stop.is_set():
        if record.reserved_bytes > record.limit_bytes:
            record.release(record.reserved_bytes - max(record.limit_bytes, 2 * MiB))  # keeps one null page
        await asyncio.sleep(0.02)


def test_kv_level_zeroes_the_limit_and_restores_it(shm_dir):
    async def scenario():
        record = BudgetRecord.create(512 * MiB, name="tiny-kvcached-ab12cd", page_bytes=2 * MiB, limit_bytes=256 * MiB)
        assert record.try_reserve(64 * MiB)
        record.set_used(0, 0, reserved_pages=32)
        port = free_port()
        runner, _ = await start_noop_server("127.0.0.1", port, "m", kv_instance="tiny-kvcached-ab12cd")
        stop = asyncio.Event()
        engine = asyncio.create_task(fake_engine_gives_pages_back(record, stop))
        backend = Backend("tiny-kvcached", "m", f"http://127.0.0.1:{port}", kvcached=True)
        async with aiohttp.ClientSession() as session:
            manager = SleepManager({"m": backend}, TrafficMonitor(), SleepSettings(), session=lambda: session,
                                   gpu=False)
            assert manager.status()["models"]["m"]["level"] == "kv"
            entry = await manager.sleep("m")
            asleep = find_instance(record.name)
            assert asleep.effective_limit_bytes == 0 and asleep.limit_bytes == 256 * MiB, "a lease, not a new limit"
            assert entry["freed_kv_bytes"] == 62 * MiB and entry["level"] == "kv"
            last = manager.status()["models"]["m"]["last_sleep"]
            assert last["memory_before"]["kv_reserved_bytes"] == 64 * MiB
            assert last["memory_after"]["kv_reserved_bytes"] == 2 * MiB
            woke = await manager.wake("m")
            assert woke["woken"] and find_instance(record.name).effective_limit_bytes == 256 * MiB
        stop.set()
        await engine
        await runner.cleanup()
        record.close()
    asyncio.run(scenario())


def test_kv_level_without_kvcached_names_the_fix(shm_dir):
    async def scenario():
        port = free_port()
        runner, _ = await start_noop_server("127.0.0.1", port, "m")  # no kvcached stats
        backend = Backend("plain", "m", f"http://127.0.0.1:{port}", kvcached=True)
        async with aiohttp.ClientSession() as session:
            manager = SleepManager({"m": backend}, TrafficMonitor(), SleepSettings(), session=lambda: session,
                                   gpu=False)
            try:
                await manager.sleep("m")
                raise AssertionError("sleep should have failed")
            except Exception as e:
                assert "ENABLE_KVCACHED=true" in str(e)
            assert manager.state("m") == "awake"
        await runner.cleanup()
    asyncio.run(scenario())


def test_default_levels_per_device():
    kv = Backend("a", "a", "http://x:1", kvcached=True)
    plain = Backend("b", "b", "http://x:2")
    gpu_sleep = Backend("c", "c", "http://x:3", kvcached=True, sleep_mode=True)
    assert default_sleep_level(kv, gpu=False) == "kv"
    assert default_sleep_level(plain, gpu=False) == "stop"
    assert default_sleep_level(gpu_sleep, gpu=False) == "kv"
    assert default_sleep_level(gpu_sleep, gpu=True) == "engine"
    assert "kvlab serve" in StopLevel(plain).unavailable_reason()
    assert "ENABLE_KVCACHED" in KVLevel(plain, lambda: None).unavailable_reason()


def test_memory_probe_reads_this_process_tree():
    import os

    class Me:
        def pids(self) -> list[int]:
            return [os.getpid()]

    out = measure_memory(Backend("me", "me", "http://127.0.0.1:1", process=Me()), None)
    assert out["pids"] == 1 and out["pss_bytes"] > 0 and out["rss_bytes"] >= out["pss_bytes"]


_ROUTER_THAT_DIES = r"""
import asyncio, sys
import aiohttp
import pytest
from kvlab.bench.noop_server import start_noop_server
from kvlab.engines.ports import free_port
from kvlab.router.backends import Backend
from kvlab.router.settings import SleepSettings
from kvlab.router.sleep import SleepManager
from kvlab.router.traffic import TrafficMonitor

async def main():
    port = free_port()
    runner, _ = await start_noop_server("127.0.0.1", port, "m", kv_instance=sys.argv[1])
    backend = Backend("engine", "m", f"http://127.0.0.1:{port}", kvcached=True)
    async with aiohttp.ClientSession() as session:
        manager = SleepManager({"m": backend}, TrafficMonitor(), SleepSettings(), session=lambda: session, gpu=False)
        await manager.sleep("m")
        print("asleep", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.faults
def test_a_kv_sleep_ends_when_the_router_dies(shm_dir):
    """A router SIGKILLed while a model sleeps must not leave the engine at limit 0: the sleep is a lease."""
    import os
    import signal
    import subprocess
    import sys
    import time

    record = BudgetRecord.create(512 * MiB, name="engine-kv", page_bytes=2 * MiB)
    router = subprocess.Popen([sys.executable, "-c", _ROUTER_THAT_DIES, record.name], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "KVCACHED_SHM_DIR": shm_dir})
    try:
        assert router.stdout.readline().strip() == "asleep"
        assert record.limit_bytes == 0, "asleep: the engine may hold nothing"
        router.send_signal(signal.SIGKILL)
        router.wait(10)
        deadline = time.monotonic() + 5
        while record.limit_bytes == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert record.limit_bytes == 512 * MiB, "the limit comes back with no one left to restore it"
    finally:
        router.kill()
        record.close()

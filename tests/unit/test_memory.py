"""Memory probes on real process trees: a child and grandchild that share one memfd and own private memory."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path
from typing import Iterator

import pytest

from kvlab import probes as memory
from kvlab.probes import HostTreeSource, KvcachedSource, MemorySampler, NvmlSource, process_tree, read_memory_csv
from kvlab.probes.nvml import visible_devices
from kvlab.probes.proc import tree_memory, tree_pss
from kvlab.probes.vllm_metrics import parse_prometheus

MiB = 1 << 20
SHARED_MB = 96
CHILD_ANON_MB = 48
GRANDCHILD_ANON_MB = 32

# A child that fills a memfd and private memory, then forks a grandchild that maps the same memfd (touching
# every page) and allocates its own private memory. Prints "ready <child> <grandchild>" and waits for stdin EOF.
TREE_SCRIPT = textwrap.dedent(f"""
    import mmap, os, sys
    MiB = 1 << 20
    fd = os.memfd_create("kvlab-test-pool")
    os.ftruncate(fd, {SHARED_MB} * MiB)
    shared = mmap.mmap(fd, {SHARED_MB} * MiB, mmap.MAP_SHARED)
    for off in range(0, len(shared), 4096):
        shared[off] = 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        mine = mmap.mmap(fd, {SHARED_MB} * MiB, mmap.MAP_SHARED)
        total = 0
        for off in range(0, len(mine), 4096):
            total += mine[off]
        private = bytearray(b"x" * ({GRANDCHILD_ANON_MB} * MiB))
        os.write(w, b"1")
        sys.stdin.read()
        os._exit(0)
    private = bytearray(b"y" * ({CHILD_ANON_MB} * MiB))
    os.read(r, 1)
    print("ready", os.getpid(), pid, flush=True)
    sys.stdin.read()
    os.waitpid(pid, 0)
""")


@pytest.fixture
def memory_tree() -> Iterator[tuple[int, int]]:
    """(child pid, grandchild pid) of a live tree with a 96 MiB memfd mapped by both."""
    proc = subprocess.Popen([sys.executable, "-c", TREE_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline().split()
        assert line and line[0] == "ready", f"tree script failed: {line}"
        yield int(line[1]), int(line[2])
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_process_tree_finds_grandchild(memory_tree: tuple[int, int]) -> None:
    child, grandchild = memory_tree
    assert set(process_tree(child)) == {child, grandchild}
    assert process_tree(2 ** 22 + 7) == []  # beyond pid_max: never a live process


def test_shared_memfd_is_counted_once(memory_tree: tuple[int, int]) -> None:
    child, grandchild = memory_tree
    figures = tree_memory([child, grandchild])
    assert figures["processes"] == 2
    # Both processes see the whole pool; the sum would count it twice.
    assert figures["rss_shmem_sum_bytes"] >= 2 * SHARED_MB * MiB * 0.95
    assert SHARED_MB * MiB * 0.95 <= figures["rss_shmem_bytes"] <= SHARED_MB * MiB * 1.05
    private = (CHILD_ANON_MB + GRANDCHILD_ANON_MB) * MiB
    assert figures["rss_anon_bytes"] >= private
    assert figures[memory.MEM_BYTES] == figures["rss_anon_bytes"] + figures["rss_shmem_bytes"]


def test_cheap_figure_agrees_with_pss(memory_tree: tuple[int, int]) -> None:
    """mem_bytes (RssAnon summed + RssShmem once) against PSS (Pss_Anon + Pss_Shmem), which splits shared pages.

    They differ only by the interpreter's copy-on-write pages shared after fork (RssAnon counts them in both
    processes): a few MiB on a tree of ~180 MiB."""
    pids = process_tree(memory_tree[0])
    cheap = tree_memory(pids)[memory.MEM_BYTES]
    pss = tree_pss(pids)[memory.PSS_MEM_BYTES]
    assert pss >= (SHARED_MB + CHILD_ANON_MB + GRANDCHILD_ANON_MB) * MiB * 0.95
    assert abs(cheap - pss) <= max(0.08 * pss, 16 * MiB), (cheap / MiB, pss / MiB)


def test_sampler_writes_tidy_csv_on_the_monotonic_clock(memory_tree: tuple[int, int], tmp_path: Path) -> None:
    out = tmp_path / "memory.csv"
    before = time.monotonic()
    with MemorySampler([HostTreeSource("tree", memory_tree[0], pss_interval_s=0.2)], interval_s=0.01,
                       out_csv=out) as sampler:
        time.sleep(0.5)
    after = time.monotonic()
    df = read_memory_csv(out)
    assert list(df.columns) == ["t_s", "series", "metric", "value"]
    assert len(df) == len(sampler.samples())  # every kept sample is on disk
    assert set(df["series"]) == {"tree"}
    assert {memory.MEM_BYTES, memory.PSS_MEM_BYTES, "rss_file_bytes"} <= set(df["metric"])
    assert df["t_s"].between(before, after).all()
    mem = df[df.metric == memory.MEM_BYTES]
    pss = df[df.metric == memory.PSS_MEM_BYTES]
    assert len(mem) > 3 * len(pss) >= 3  # the cheap figure runs at the fast rate, PSS at the slow one
    assert mem["value"].min() >= (SHARED_MB + CHILD_ANON_MB) * MiB
    assert sampler.errors == []
    assert sampler.cpu_time_s() > 0


def test_sampler_follows_a_tree_that_exits(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; b = b'x' * (30 << 20); print('ready', flush=True); "
                             "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    sampler = MemorySampler([HostTreeSource("short", proc.pid, pss_interval_s=None, refresh_s=0.05)],
                            interval_s=0.01, out_csv=tmp_path / "m.csv").start()
    try:
        time.sleep(0.3)
        proc.stdin.close()
        proc.wait(timeout=10)
        time.sleep(0.2)
    finally:
        sampler.stop()
    df = sampler.dataframe()
    mem = df[df.metric == memory.MEM_BYTES]
    assert mem["value"].max() >= 30 * MiB
    assert sampler.errors == []  # a vanished process gives no rows, not an error


def test_kvcached_source_reads_budget_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcached.budget import BudgetRecord

    monkeypatch.setenv("KVCACHED_SHM_DIR", str(tmp_path / "shm"))
    with BudgetRecord.create(64 * MiB, name="engine-a-1", group="grp", page_bytes=2 * MiB) as a, \
            BudgetRecord.create(64 * MiB, name="other-1", group="grp2", page_bytes=2 * MiB):
        assert a.try_reserve(6 * MiB)
        a.set_used(4 * MiB, 2, reserved_pages=3)
        assert KvcachedSource("a", "engine-a").read() == [], "a name is matched exactly, never as a prefix"
        readings = {m: v for s, m, v in KvcachedSource("a", "engine-a-1").read()}
        assert readings[memory.KV_RESERVED_BYTES] == 6 * MiB
        assert readings["kv_used_bytes"] == 4 * MiB
        assert readings["kv_pools"] == 1
        by_group = {m: v for s, m, v in KvcachedSource("g", group="grp2").read()}
        assert by_group[memory.KV_RESERVED_BYTES] == 0
        import os

        mine = types.SimpleNamespace(pid=os.getpid())  # a "server" whose tree is this process
        assert {m for _, m, _ in KvcachedSource("me", server=mine).read()} >= {memory.KV_RESERVED_BYTES}
        assert KvcachedSource("none", "no-such-pool").read() == []
    with pytest.raises(ValueError, match="name="):
        KvcachedSource("x")


def test_parse_prometheus_sums_label_sets() -> None:
    text = textwrap.dedent("""\
        # HELP vllm:num_requests_running Number of requests in model execution batches.
        # TYPE vllm:num_requests_running gauge
        vllm:num_requests_running{engine="0",model_name="m"} 3.0
        vllm:num_requests_running{engine="1",model_name="a b"} 2.0
        vllm:num_requests_waiting{engine="0",model_name="m"} 1.0 1712345678000
        vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
        vllm:prompt_tokens_total{model_name="m"} 99.0
        """)
    assert parse_prometheus(text) == {"requests_running": 5.0, "requests_waiting": 1.0, "kv_cache_usage": 0.25}


def test_vllm_metrics_source_without_server_gives_no_samples() -> None:
    from kvlab.engines.ports import free_port

    source = memory.VllmMetricsSource("s", f"http://127.0.0.1:{free_port()}", timeout_s=0.5)
    assert source.read() == []
    assert source.errors == 1


class FakeNvml:
    """A fake of the pynvml module (no GPU here): four devices, processes on devices 1 and 3."""

    class NVMLError(Exception):
        pass

    UUIDS = ["GPU-aaaa-0000", "GPU-bbbb-1111", "GPU-bbcc-2222", "GPU-dddd-3333"]

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init = fail_init

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.UUIDS)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return self.UUIDS[handle].encode()

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(used=(handle + 1) * 1000, total=80_000, free=80_000 - (handle + 1) * 1000)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[types.SimpleNamespace]:
        import os

        return [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=500)] if handle in (1, 3) else []


@pytest.mark.parametrize("env, expected", [
    (None, [0, 1, 2, 3]),
    ("2,0", [2, 0]),
    ("GPU-dddd,1", [3, 1]),
    ("1,7,2", [1]),  # CUDA stops at the first invalid entry
    ("GPU-bb", []),  # ambiguous prefix is invalid
    ("3,3", [3]),  # a repeated device ends the list
    ("", []),
    ("-1", []),
])
def test_visible_devices_follow_cuda_visible_devices(env: str | None, expected: list[int]) -> None:
    assert [i for i, _ in visible_devices(FakeNvml(), env)] == expected


def test_nvml_source_maps_ordinals_and_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    one = NvmlSource(device=0, nvml=FakeNvml(), processes={"me": os.getpid()})
    assert one.available and one.devices == [(3, "GPU-dddd-3333")]
    assert (one.series, memory.GPU_USED_BYTES, 4000.0) in one.read()
    assert one.read_processes() == [("me", "gpu_process_bytes", 500.0)]
    both = NvmlSource(nvml=FakeNvml())
    assert {s for s, _, _ in both.read()} == {"gpu0", "gpu1"}
    with_bad = NvmlSource(device=5, nvml=FakeNvml())
    assert not with_bad.available and "not visible" in with_bad.unavailable_reason


def test_nvml_source_without_driver_says_so() -> None:
    source = NvmlSource(nvml=FakeNvml(fail_init=True))
    assert not source.available
    assert "no NVIDIA driver" in source.unavailable_reason
    assert source.probes() == []
    MemorySampler([source]).start().stop()  # a sampler with nothing to read starts and stops cleanly


def test_one_failing_probe_does_not_stop_the_others(tmp_path: Path) -> None:
    class Broken:
        interval_s = None

        def read(self) -> list:
            raise RuntimeError("boom")

        def probes(self) -> list:
            return [self]

    calls = threading.Event()

    class Fine:
        interval_s = None

        def read(self) -> list:
            calls.set()
            return [("fine", "x", 1.0)]

        def probes(self) -> list:
            return [self]

    with MemorySampler([Broken(), Fine()], interval_s=0.01) as sampler:
        assert calls.wait(5)
    assert sampler.errors and "boom" in sampler.errors[0]
    assert all(s.series == "fine" for s in sampler.samples())


def test_status_reader_keeps_descriptors_and_drops_dead_processes() -> None:
    from kvlab.probes.proc import StatusReader, read_status

    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    reader = StatusReader()
    try:
        first = reader(proc.pid)
        assert first is not None and first.keys() >= {"anon", "file", "shmem"}
        assert reader(proc.pid)["anon"] > 0  # re-read through the kept descriptor
        assert read_status(proc.pid) is not None
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    assert reader(proc.pid) is None  # the descriptor of a dead process reads nothing: never another process
    assert read_status(proc.pid) is None
    reader.close()


def test_committed_but_untouched_shared_file_is_counted() -> None:
    """kvcached's scheduler commits pool pages with fallocate; until the worker touches them no RSS shows them,
    but they hold memory. The tree figure counts the unlinked tmpfs file's allocated blocks."""
    code = textwrap.dedent("""
        import os, sys, time
        path = f"/dev/shm/kvlab-test-pool-{os.getpid()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.unlink(path)
        os.posix_fallocate(fd, 0, 64 << 20)
        print("ready", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        source = HostTreeSource("pool", child.pid, pss_interval_s=None)
        figures = source._tree_memory(source.pids())
        assert figures["rss_shmem_bytes"] < 8 << 20  # nothing mapped...
        assert figures["shm_file_bytes"] >= 64 << 20  # ...but 64 MiB committed
        assert figures[memory.MEM_BYTES] >= figures["rss_anon_bytes"] + (64 << 20)
    finally:
        child.kill()
        child.wait()


def test_prompt_tokens_by_source_reads_the_counters_not_their_timestamps():
    from kvlab.probes.vllm_metrics import prompt_tokens_by_source

    text = "\n".join([
        "# TYPE vllm:prompt_tokens_by_source counter",
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 626.0',
        'vllm:prompt_tokens_by_source_created{engine="0",model_name="m",source="local_compute"} 1.79e+09',
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"} 512.0',
        'vllm:prompt_tokens_by_source_total{engine="1",model_name="m",source="external_kv_transfer"} 128.0',
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 9999.0',
    ])
    assert prompt_tokens_by_source(text) == {"local_compute": 626.0, "local_cache_hit": 0.0,
                                             "external_kv_transfer": 640.0}

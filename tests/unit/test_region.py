"""kvcached._core.Region, host backend, on real memory: commit and release, zero-cost holes, sharing between
processes through a /dev/shm path, sweep of stray pages, DLPack lifetime, rollback, thread safety."""
from __future__ import annotations

import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kvcached import _core

MiB = 1 << 20
PAGE = 2 * MiB


def pss_bytes() -> int:
    """Proportional set size of this process: shared tmpfs pages count here once we have them mapped."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Pss line in /proc/self/smaps_rollup")


def file_bytes(path: str) -> int:
    """Bytes the kernel allocated to a tmpfs file (block count), the ground truth for memory held."""
    return os.stat(path).st_blocks * 512


def view(region: _core.Region) -> np.ndarray:
    """A writable numpy view of the whole region (numpy asks for a versioned DLPack capsule)."""
    return np.from_dlpack(region)


@pytest.fixture
def shm_path() -> Iterator[str]:
    path = f"/dev/shm/kvcached-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield path
    if os.path.exists(path):
        os.unlink(path)


def test_map_commits_and_unmap_gives_memory_back(shm_path: str) -> None:
    region = _core.Region(32 * MiB, PAGE, path=shm_path)
    header = file_bytes(shm_path)
    assert region.backing_bytes == 0 and region.resident_pages() == []

    region.map([0, 1, 2, 3, 8, 9, 10, 11])
    assert region.num_mapped == 8
    assert region.backing_bytes == 8 * PAGE
    assert file_bytes(shm_path) - header == 8 * PAGE
    assert region.resident_pages() == [0, 1, 2, 3, 8, 9, 10, 11]

    buf = view(region)
    before = pss_bytes()
    buf[: 4 * PAGE] = 1
    buf[8 * PAGE : 12 * PAGE] = 2
    touched = pss_bytes()
    assert touched - before >= 14 * MiB  # 16 MiB written; allow for unrelated churn

    region.unmap([0, 1, 2, 3, 8, 9, 10, 11])
    assert region.num_mapped == 0
    assert region.resident_pages() == []
    assert region.backing_bytes == 0
    assert file_bytes(shm_path) == header
    assert pss_bytes() - before < 2 * MiB
    assert not buf[: 12 * PAGE].any()  # released pages read as zeros, from the zero page


def test_reading_unmapped_pages_commits_nothing() -> None:
    region = _core.Region(64 * MiB, PAGE)
    buf = view(region)
    before = pss_bytes()
    assert int(buf.sum()) == 0  # reads every byte of every hole
    assert region.resident_pages() == []
    assert region.backing_bytes == 0
    assert pss_bytes() - before < 2 * MiB

    region.map([3])
    buf[3 * PAGE : 4 * PAGE] = 5
    region.unmap([3])
    assert int(buf.sum()) == 0
    assert region.resident_pages() == []
    assert region.backing_bytes == 0


def test_prefault_populates_at_map_time() -> None:
    region = _core.Region(16 * MiB, PAGE, prefault=True)
    view(region)
    before = pss_bytes()
    region.map([0, 1, 2, 3])
    assert pss_bytes() - before >= 7 * MiB  # 8 MiB present without a single touch from us
    region.unmap([0, 1, 2, 3])
    assert pss_bytes() - before < 2 * MiB


def test_map_and_unmap_skip_pages_already_in_that_state() -> None:
    region = _core.Region(8 * MiB, PAGE)
    region.map([1])
    view(region)[PAGE : 2 * PAGE] = 9
    region.map([1, 2, 2])  # page 1 keeps its data; duplicates are fine
    assert region.num_mapped == 2
    assert int(view(region)[PAGE]) == 9
    region.unmap([0, 3])  # never mapped: nothing happens
    assert region.num_mapped == 2
    assert [region.is_mapped(p) for p in range(4)] == [False, True, True, False]


def test_out_of_range_pages_raise_and_change_nothing() -> None:
    region = _core.Region(8 * MiB, PAGE)
    region.map([0])
    with pytest.raises(IndexError, match="out of range"):
        region.map([1, 2, 4])
    with pytest.raises(IndexError):
        region.map([-1])
    with pytest.raises(IndexError):
        region.unmap([0, 99])
    with pytest.raises(IndexError):
        region.is_mapped(4)
    assert region.num_mapped == 1
    assert region.resident_pages() == [0]
    assert region.backing_bytes == PAGE


def test_invalid_parameters_name_the_fix(shm_path: str) -> None:
    with pytest.raises(ValueError, match="multiple of page_size"):
        _core.Region(3 * MiB, PAGE)
    with pytest.raises(ValueError, match="OS page size"):
        _core.Region(3000 * 4, 3000)
    with pytest.raises(ValueError, match="unknown backend"):
        _core.Region(PAGE, PAGE, backend="tpu")
    with pytest.raises(ValueError, match="non-negative"):
        _core.Region(-PAGE, PAGE)
    _core.Region(8 * MiB, PAGE, path=shm_path).close()
    with pytest.raises(ValueError, match=shm_path):
        _core.Region(16 * MiB, PAGE, path=shm_path)
    with pytest.raises(ValueError, match=shm_path):
        _core.Region(8 * MiB, 1 * MiB, path=shm_path)


def test_properties_and_close() -> None:
    region = _core.Region(8 * MiB, PAGE)
    assert (region.size, region.page_size, region.num_pages) == (8 * MiB, PAGE, 4)
    assert (region.backend, region.device, region.path) == ("host", 0, None)
    assert region.address % PAGE == 0
    assert region.__dlpack_device__() == (1, 0)
    with pytest.raises(TypeError, match="cuda"):
        _ = region.pool_size
    with pytest.raises(TypeError, match="cuda"):
        region.trim_pool()
    region.close()
    assert region.closed
    with pytest.raises(ValueError, match="closed"):
        region.map([0])
    assert _core.granularity() == os.sysconf("SC_PAGE_SIZE")
    assert isinstance(_core.cuda_available(), bool)


def test_two_regions_on_one_path_share_the_committed_state(shm_path: str) -> None:
    owner = _core.Region(16 * MiB, PAGE, path=shm_path)
    follower = _core.Region(16 * MiB, PAGE, path=shm_path)
    owner.map([1, 2])
    view(owner)[PAGE : 3 * PAGE] = 3
    assert follower.is_mapped(1) and follower.num_mapped == 2
    assert int(view(follower)[PAGE]) == 0  # its view is stale until sync: it still sees the zero page
    assert follower.sync() == 2
    assert follower.sync() == 0
    assert int(view(follower)[2 * PAGE + 7]) == 3
    owner.unmap([1])
    assert follower.sync() == 1
    assert int(view(follower)[PAGE]) == 0
    assert owner.resident_pages() == [2]


def test_torch_dlpack_views_keep_the_region_alive() -> None:
    region = _core.Region(8 * MiB, PAGE)
    region.map([0, 1])
    whole = torch.from_dlpack(region)
    part = torch.from_dlpack(region.dlpack(PAGE, 1024))
    assert whole.dtype == torch.int8 and whole.shape == (8 * MiB,)
    assert whole.data_ptr() == region.address and part.data_ptr() == region.address + PAGE
    address, size = region.address, region.size

    del region
    gc.collect()
    part[:] = 42  # the memory is still mapped: the views hold the region
    assert int(whole[PAGE + 1023]) == 42
    assert int(whole[PAGE + 1024]) == 0
    assert _address_mapped(address, size)

    del whole, part
    gc.collect()
    assert not _address_mapped(address, size)


def test_close_keeps_memory_for_live_views() -> None:
    fds_before = _memfd_count()
    region = _core.Region(4 * MiB, PAGE)
    region.map([0])
    tensor = torch.from_dlpack(region.dlpack(0, PAGE))
    address = region.address
    region.close()
    tensor.fill_(7)
    assert int(tensor.sum()) == 7 * PAGE
    del tensor
    gc.collect()
    assert not _address_mapped(address, PAGE)
    assert _memfd_count() == fds_before


def test_dlpack_capsule_flavours() -> None:
    region = _core.Region(4 * MiB, PAGE)
    assert '"dltensor"' in repr(region.dlpack())
    assert '"dltensor"' in repr(region.__dlpack__())
    assert '"dltensor_versioned"' in repr(region.__dlpack__(max_version=(1, 0)))
    region.map([0])
    array = np.from_dlpack(region)  # numpy asks for 1.0: the view is writable
    assert array.flags.writeable
    array[:3] = 4
    assert int(torch.from_dlpack(region)[:3].sum()) == 12
    gc.collect()


def test_dlpack_bounds() -> None:
    region = _core.Region(4 * MiB, PAGE)
    with pytest.raises(IndexError, match="outside the region"):
        region.dlpack(PAGE, 4 * MiB)
    with pytest.raises(IndexError):
        region.dlpack(-1)
    capsule = region.dlpack()
    del capsule  # an unconsumed capsule frees its tensor without a consumer
    gc.collect()


def test_threads_map_and_unmap_disjoint_pages_concurrently() -> None:
    page = _core.granularity()
    region = _core.Region(256 * page, page)
    final: dict[int, set[int]] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            rng = random.Random(t)
            mine = list(range(t, 256, 4))
            held: set[int] = set()
            for _ in range(150):
                chosen = rng.sample(mine, 8)
                if rng.random() < 0.5:
                    region.map(chosen)
                    held.update(chosen)
                else:
                    region.unmap(chosen)
                    held.difference_update(chosen)
                region.sync()
                region.resident_pages()
            final[t] = held
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    expected = sorted(set().union(*final.values()))
    assert region.num_mapped == len(expected)
    assert region.resident_pages() == expected
    assert [p for p in range(256) if region.is_mapped(p)] == expected
    assert region.backing_bytes == len(expected) * page


_CHILD = textwrap.dedent(
    """
    import ctypes, sys
    from kvcached import _core
    path, size, page = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    region = _core.Region(size, page, path=path)   # opening a path shows what is committed already

    def read(p):
        return ctypes.string_at(region.address + p * page, page)

    def say(msg):
        print(msg, flush=True)

    say("pattern" if read(0) == bytes([0xAB]) * page and read(1)[:3] == b"xyz" else "bad pattern")
    sys.stdin.readline()                            # the owner unmapped pages 0 and 1
    stray = read(0)                                 # stale view: this read commits a stray page
    say("stray-read-zero" if stray == bytes(page) else "stray-read-data")
    changed = region.sync()
    say(f"synced {changed} {int(any(read(0)) or any(read(1)))}")
    sys.stdin.readline()
    """
)


def test_two_processes_share_a_pool_and_sweep_reclaims_strays(shm_path: str) -> None:
    size, page = 8 * MiB, PAGE
    owner = _core.Region(size, page, path=shm_path)
    owner.map([0, 1])
    buf = view(owner)
    buf[:page] = np.frombuffer(bytes([0xAB]), dtype=np.int8)[0]
    buf[page : page + 3] = np.frombuffer(b"xyz", dtype=np.int8)

    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, shm_path, str(size), str(page)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "pattern"

        owner.unmap([0, 1])
        assert owner.resident_pages() == []
        assert owner.backing_bytes == 0
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "stray-read-zero"
        assert child.stdout.readline().strip() == "synced 2 0"

        # The child's stale read allocated page 0 although nobody committed it.
        assert owner.resident_pages() == [0]
        assert owner.backing_bytes == page
        assert owner.sweep() == 1
        assert owner.resident_pages() == []
        assert owner.backing_bytes == 0
        assert owner.sweep() == 0
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


_ROLLBACK_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from kvcached import _core
    MiB = 1 << 20
    path = os.path.join(sys.argv[1], "pool")
    region = _core.Region(32 * MiB, 2 * MiB, path=path)
    region.map([0])
    out = {}
    try:
        region.map([2, 4, 6, 8])                    # 2 and 4 fit in the 8 MiB tmpfs, 6 does not
        out["raised"] = None
    except MemoryError as e:
        out["raised"] = str(e)
    out["num_mapped"] = region.num_mapped
    out["mapped"] = [p for p in range(16) if region.is_mapped(p)]
    out["resident"] = region.resident_pages()
    out["backing"] = region.backing_bytes
    region.map([2, 4])                              # the rolled-back memory really came back
    out["after"] = region.num_mapped
    print(json.dumps(out))
    """
)


def test_failed_map_rolls_back_everything_it_committed() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a size-limited tmpfs in a private mount namespace")
    workdir = tempfile.mkdtemp(prefix="kvcached-rollback-")
    try:
        script = f'mount -t tmpfs -o size=8m kvcached-test "{workdir}" && exec "{sys.executable}" -c "$0" "{workdir}"'
        proc = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, _ROLLBACK_CHILD],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0 and "mount" in proc.stderr and not proc.stdout:
            pytest.skip(f"cannot mount a private tmpfs here (user namespaces disabled?): {proc.stderr.strip()}")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert out["raised"] and "No space left" in out["raised"]
    assert out["num_mapped"] == 1 and out["mapped"] == [0]
    assert out["resident"] == [0]
    assert out["backing"] == 2 * MiB
    assert out["after"] == 3


def _address_mapped(address: int, size: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo < address + size and address < hi:
                return True
    return False


def _memfd_count() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:kvcached-region"):
                count += 1
        except OSError:
            continue
    return count


def test_state_region_records_decisions_without_memory(shm_path: str) -> None:
    scheduler = _core.Region(16 * MiB, PAGE, backend="state", path=shm_path)
    other = _core.Region(16 * MiB, PAGE, backend="state", path=shm_path)
    assert scheduler.backend == "state" and scheduler.address == 0
    scheduler.map([0, 3])
    assert other.num_mapped == 2 and other.is_mapped(3)
    assert scheduler.sync() == 0 and scheduler.resident_pages() == [] and scheduler.backing_bytes == 0
    assert os.stat(shm_path).st_size < PAGE  # the file holds the header only: no memory behind it
    scheduler.unmap([0])
    assert other.num_mapped == 1
    with pytest.raises(ValueError, match="no memory"):
        scheduler.dlpack()
    with pytest.raises(ValueError, match="needs path"):
        _core.Region(16 * MiB, PAGE, backend="state")


def test_state_region_refuses_a_host_region_file(shm_path: str) -> None:
    _core.Region(16 * MiB, PAGE, path=shm_path).close()
    with pytest.raises(ValueError, match=shm_path):
        _core.Region(16 * MiB, PAGE, backend="state", path=shm_path)

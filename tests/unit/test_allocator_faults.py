"""Faults at the allocator's real boundaries: a backend that raises, a tmpfs that fills, a double release.

Invariants after each fault: no page lost or double-counted (the allocator's states agree with the region), the
budget holds exactly what the region holds, nothing waits forever (close() returns), and the error is raised."""
from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from kvcached_testing import RecordingRegion, core_region_class

from kvcached.budget import BudgetRecord
from kvcached.layout import KVLayout
from kvcached.page_allocator import IDLE, IN_USE, PageAllocator

P = 2 << 20
pytestmark = pytest.mark.faults


def _allocator(n_pages: int = 8, layers: int = 2, **kw):
    layout = KVLayout(num_blocks=n_pages, block_bytes=P, num_layers=layers, page_size=P)
    region = RecordingRegion(layout.region_size, P)
    record = BudgetRecord.create(layout.num_logical_pages * layout.logical_page_bytes, name="faults",
                                 page_bytes=layout.logical_page_bytes)
    kw.setdefault("reserve_pages", 0)
    kw.setdefault("reclaim_delay_s", 0.0)
    alloc = PageAllocator(layout, region, record, background=kw.pop("background", False), **kw)
    return alloc, region, record


def _consistent(alloc: PageAllocator, region: RecordingRegion, record: BudgetRecord) -> None:
    for p in range(alloc.layout.num_logical_pages):
        mapped = [rp in region.mapped for rp in alloc.layout.region_pages(p)]
        state = alloc._state[p]
        if p in alloc._partial:  # an unmap stopped half-way: idle, mapped again before any reuse
            assert state == IDLE and any(mapped) and not all(mapped), (p, state, mapped)
        else:
            assert all(mapped) if state in (IN_USE, IDLE) else not any(mapped), (p, state, mapped)
    assert record.reserved_bytes == len(region.mapped) * P, "the budget holds exactly what the region holds"
    assert record.used_bytes == alloc.stats().in_use_pages * alloc.page_bytes


@pytest.mark.parametrize("fault", [OSError(5, "EIO injected"), RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS injected")])
def test_a_failing_map_rolls_back_and_is_raised(shm_dir, fault):
    alloc, region, record = _allocator(reclaim_delay_s=60.0)  # released pages stay idle (mapped) for the test
    assert alloc.acquire_pages([0])
    alloc.release_pages([0])  # page 0 is idle: a reused page must go back to idle, not stay in use
    region.fail_next_map = fault
    with pytest.raises(type(fault)):
        alloc.acquire_pages([0, 1, 2])
    assert alloc.page_state(0) == "idle" and alloc.page_state(1) == "unmapped"
    _consistent(alloc, region, record)
    assert alloc.acquire_pages([1, 2]), "the pages are usable once the fault is gone"
    _consistent(alloc, region, record)
    alloc.close()  # nothing left MAPPING: close does not wait forever
    assert record.reserved_bytes == 0 and not region.mapped
    record.close()


def test_a_failing_unmap_keeps_what_is_still_mapped(shm_dir):
    alloc, region, record = _allocator(reclaim_delay_s=60.0)
    assert alloc.acquire_pages([0, 1, 2])
    alloc.release_pages([0, 1, 2])
    region.fail_next_unmap = OSError(5, "EIO injected")
    region.fail_after = 1  # region pages go in address order: layer 0 of page 0 went before the failure
    with pytest.raises(OSError):
        alloc.trim()
    assert alloc._partial == {0}, "page 0 kept one layer: half mapped"
    assert [alloc.page_state(p) for p in (0, 1, 2)] == ["idle"] * 3, "still (partly) mapped: idle, retried later"
    _consistent(alloc, region, record)
    assert alloc.acquire_pages([0]), "a half-unmapped page is mapped whole again before it is reused"
    assert all(rp in region.mapped for rp in alloc.layout.region_pages(0)) and not alloc._partial
    _consistent(alloc, region, record)
    alloc.release_pages([0])
    assert alloc.trim() == 3
    _consistent(alloc, region, record)
    alloc.close()
    record.close()


def test_a_failing_prefetch_leaves_no_page_half_done(shm_dir):
    alloc, region, record = _allocator(reserve_pages=2)
    assert alloc.acquire_pages([0])
    region.fail_next_map = OSError(5, "EIO injected")
    with pytest.raises(OSError):
        alloc._top_up()
    assert alloc.idle_pages() == [] and all(alloc.page_state(p) != "prefetching" for p in range(8))
    _consistent(alloc, region, record)
    alloc._want_topup = True
    alloc._top_up()
    assert len(alloc.idle_pages()) == 2
    _consistent(alloc, region, record)
    alloc.close()
    record.close()


def test_the_reclaim_thread_survives_a_fault_and_nobody_waits_forever(shm_dir):
    alloc, region, record = _allocator(background=True, reclaim_delay_s=0.05)
    assert alloc.acquire_pages([0, 1])
    region.fail_next_unmap = OSError(5, "EIO injected")
    alloc.release_pages([0, 1])
    deadline = time.monotonic() + 10
    while region.fail_next_unmap is not None:  # until the reclaim thread has met the fault
        assert time.monotonic() < deadline, "the reclaim thread never tried to unmap"
        time.sleep(0.01)
    while region.mapped:  # it keeps reclaiming: the pages go on a later tick
        assert time.monotonic() < deadline, "the reclaim thread stopped after the fault"
        time.sleep(0.01)
    _consistent(alloc, region, record)
    done = threading.Event()
    threading.Thread(target=lambda: (alloc.acquire_pages([1]), done.set()), daemon=True).start()
    assert done.wait(10), "no acquire is left waiting on a page after a failed unmap"
    alloc.close()
    assert record.reserved_bytes == 0 and not region.mapped
    record.close()


def test_release_of_the_same_page_twice_is_an_error_and_counts_stay_right(shm_dir):
    alloc, region, record = _allocator()
    assert alloc.acquire_pages([3])
    with pytest.raises(ValueError, match="double release"):
        alloc.release_pages([3, 3])
    assert alloc.stats().in_use_pages == 1 and alloc.page_state(3) == "in use"
    alloc.release_pages([3])
    assert alloc.stats().in_use_pages == 0
    with pytest.raises(ValueError):
        alloc.release_pages([3])
    assert alloc.stats().in_use_pages == 0
    alloc.close()
    record.close()


# ---- a real tmpfs that fills -------------------------------------------------------------------------------

def _mount_small_tmpfs(size_mb: int) -> Path:
    path = Path(tempfile.mkdtemp(prefix="kvcached-tmpfs-"))
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=700", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()}): this test needs root or CAP_SYS_ADMIN")
    return path


@pytest.fixture
def small_tmpfs():
    path = _mount_small_tmpfs(16)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)
    os.rmdir(path)


@pytest.mark.skipif(core_region_class() is None, reason="needs kvcached._core: run `pip install -e .[test]`")
def test_a_full_tmpfs_is_out_of_memory_not_an_error(shm_dir, small_tmpfs):
    from kvcached import _core

    layout = KVLayout(num_blocks=16, block_bytes=P, num_layers=1, page_size=P)  # 32 MiB pool on 16 MiB of tmpfs
    region = _core.Region(layout.region_size, P, backend="host", path=str(small_tmpfs / "pool"))
    record = BudgetRecord.create(layout.region_size, name="full", page_bytes=P)
    alloc = PageAllocator(layout, region, record, reserve_pages=0, reclaim_delay_s=0.0, background=False)
    got = [p for p in range(16) if alloc.acquire_pages([p])]
    assert 0 < len(got) < 16, "the tmpfs fills before the pool does"
    assert alloc.acquire_pages([15]) is False, "ENOSPC is a refusal the caller can wait on, not an exception"
    assert record.reserved_bytes == region.num_mapped * P == len(got) * P
    alloc.release_pages(got[:2])
    assert alloc.acquire_pages([15]), "memory given back can be had again"
    alloc.close()
    assert record.reserved_bytes == 0
    record.close()
    region.close()


@pytest.mark.skipif(core_region_class() is None, reason="needs kvcached._core: run `pip install -e .[test]`")
def test_a_full_tmpfs_is_refused_before_the_budget_is_claimed(shm_dir, small_tmpfs, monkeypatch):
    """kvctl and the group cap never see a claim that no memory can back (a full tmpfs), not even while a map fails:
    the allocator asks the filesystem first."""
    from kvcached import _core

    layout = KVLayout(num_blocks=16, block_bytes=P, num_layers=1, page_size=P)
    region = _core.Region(layout.region_size, P, backend="host", path=str(small_tmpfs / "pool"))
    record = BudgetRecord.create(layout.region_size, name="full", page_bytes=P)
    alloc = PageAllocator(layout, region, record, reserve_pages=0, reclaim_delay_s=0.0, background=False)
    got = [p for p in range(16) if alloc.acquire_pages([p])]
    claims: list[int] = []
    real = record.try_reserve
    monkeypatch.setattr(record, "try_reserve", lambda n: claims.append(record.reserved_bytes + n) or real(n))
    assert alloc.acquire_pages([15]) is False
    assert claims == [], f"a claim of {claims} bytes was made for memory the full tmpfs does not have"
    alloc.release_pages(got)
    alloc.close()
    record.close()
    region.close()


# A shim over libc's fallocate, loaded with LD_PRELOAD into a child: while KVC_FAIL_FALLOCATE says so, committing
# ("commit") or releasing ("punch") pages fails with EIO, a real error of the host backend that is not out of memory,
# met by the C++ core exactly where the kernel would report it.
_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
int fallocate(int fd, int mode, off_t offset, off_t len) {
  static int (*real)(int, int, off_t, off_t);
  if (!real) real = (int (*)(int, int, off_t, off_t))dlsym(RTLD_NEXT, "fallocate");
  const char* fail = getenv("KVC_FAIL_FALLOCATE");
  if (fail) {
    int punch = (mode & FALLOC_FL_PUNCH_HOLE) != 0;
    if ((punch && strcmp(fail, "punch") == 0) || (!punch && strcmp(fail, "commit") == 0)) {
      errno = EIO;
      return -1;
    }
  }
  return real(fd, mode, offset, len);
}
"""

_FAULT_SCRIPT = r"""
import json, os, sys
from kvcached import _core
from kvcached.budget import BudgetRecord
from kvcached.layout import KVLayout
from kvcached.page_allocator import PageAllocator

P = 2 << 20
layout = KVLayout(num_blocks=8, block_bytes=P, num_layers=2, page_size=P)
region = _core.Region(layout.region_size, P, backend="host", path=sys.argv[1])
record = BudgetRecord.create(layout.num_logical_pages * layout.logical_page_bytes, name="eio", page_bytes=2 * P)
alloc = PageAllocator(layout, region, record, reserve_pages=0, reclaim_delay_s=60.0, background=False)
out = {}
assert alloc.acquire_pages([0, 1])
os.environ["KVC_FAIL_FALLOCATE"] = "commit"
try:
    alloc.acquire_pages([2, 3])
except OSError as exc:
    out["map_error"] = exc.errno
out["after_map"] = [alloc.page_state(p) for p in (0, 1, 2, 3)], region.num_mapped, record.reserved_bytes
alloc.release_pages([0, 1])
os.environ["KVC_FAIL_FALLOCATE"] = "punch"
try:
    alloc.trim()
except OSError as exc:
    out["unmap_error"] = exc.errno
out["after_unmap"] = [alloc.page_state(p) for p in (0, 1)], region.num_mapped, record.reserved_bytes
del os.environ["KVC_FAIL_FALLOCATE"]
out["retry"] = alloc.trim(), alloc.acquire_pages([2, 3]), region.num_mapped, record.reserved_bytes
alloc.close()
out["closed"] = region.num_mapped, record.reserved_bytes
record.close()
print(json.dumps(out))
"""


@pytest.mark.skipif(core_region_class() is None, reason="needs kvcached._core: run `pip install -e .[test]`")
def test_real_backend_errors_roll_back_through_the_core(shm_dir, tmp_path):
    import errno
    import json
    import shutil
    import sys

    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the fault shim (it builds kvcached's extension too)")
    shim = tmp_path / "fallocate_shim.so"
    (tmp_path / "shim.c").write_text(_SHIM_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "shim.c"), "-ldl"], check=True)
    env = {**os.environ, "KVCACHED_SHM_DIR": shm_dir, "LD_PRELOAD": str(shim)}
    out = subprocess.run([sys.executable, "-c", _FAULT_SCRIPT, str(Path(shm_dir) / "eio.pool")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    two_layers = 2 * P
    assert got["map_error"] == errno.EIO, "a commit that fails for a reason other than memory is raised"
    assert got["after_map"] == [["in use", "in use", "unmapped", "unmapped"], 4, 2 * two_layers]
    assert got["unmap_error"] == errno.EIO, "a release that fails is raised"
    # The core put the bits back for what it could not release: the pages stay idle, counted, and are retried.
    assert got["after_unmap"] == [["idle", "idle"], 4, 2 * two_layers]
    assert got["retry"] == [2, True, 4, 2 * two_layers]
    assert got["closed"] == [0, 0]

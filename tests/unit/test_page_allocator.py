"""PageAllocator against the real host Region (and a recording double where failures must be injected)."""
import time

import pytest
from kvcached_testing import RecordingRegion, make_region, mapped_pages

from kvcached.budget import BudgetRecord
from kvcached.layout import KVLayout
from kvcached.page_allocator import PageAllocator

P = 4096


def _setup(kind, *, limit_pages=None, num_layers=2, pages=8, **kw):
    lay = KVLayout(num_blocks=pages * 4, block_bytes=P // 4, num_layers=num_layers, page_size=P)
    region = make_region(kind, lay.region_size, P)
    limit = None if limit_pages is None else limit_pages * lay.logical_page_bytes
    rec = BudgetRecord.create(pages * lay.logical_page_bytes, name="alloc", limit_bytes=limit,
                              page_bytes=lay.logical_page_bytes)
    kw.setdefault("background", False)
    kw.setdefault("reserve_pages", 0)
    kw.setdefault("reclaim_delay_s", 0.0)
    return lay, region, rec, PageAllocator(lay, region, rec, **kw)


def test_acquire_maps_every_layer_and_release_unmaps(shm_dir, region_kind):
    lay, region, rec, alloc = _setup(region_kind)
    assert alloc.acquire_pages([1, 3])
    assert mapped_pages(region) == {1, 3, 9, 11}
    assert rec.reserved_bytes == 2 * lay.logical_page_bytes == rec.used_bytes
    alloc.release_pages([1, 3])  # reclaim delay 0 and no thread: reclaimed on the call
    assert mapped_pages(region) == set()
    assert rec.reserved_bytes == 0 and rec.used_bytes == 0
    alloc.close()
    rec.close()


def test_stats_count_the_region_pages_mapped_and_unmapped_and_their_time(shm_dir, region_kind):
    """What an engine logs when it stops: the cost of elasticity per page, counted at the backend call."""
    lay, region, rec, alloc = _setup(region_kind)
    assert alloc.acquire_pages([1, 3])
    assert alloc.stats().map_pages == 4 and alloc.stats().unmap_pages == 0  # 2 logical pages x 2 layers
    alloc.release_pages([1, 3])
    stats = alloc.stats()
    assert (stats.map_pages, stats.unmap_pages) == (4, 4)
    assert stats.map_s > 0 and stats.unmap_s > 0
    assert stats.demand_map_pages == 4 and stats.demand_map_s <= stats.map_s, "the caller waited for both maps"
    alloc.close()
    rec.close()


def test_the_warm_reserve_follows_the_last_seconds_demand(shm_dir, region_kind):
    """A burst that took 5 pages in the last second finds the next 5 mapped ahead (off the caller's thread, so an
    engine's scheduler does not wait for them), from the top of the pool where callers never look first; the
    caller then maps nothing itself. Once the burst is over they go back."""
    lay, region, rec, alloc = _setup(region_kind, pages=128, reserve_pages=1, reclaim_delay_s=30)
    assert alloc.acquire_pages([0, 1, 2, 3, 4])
    alloc._top_up()
    assert sorted(alloc.idle_pages()) == [123, 124, 125, 126, 127]
    assert alloc.stats().map_pages == 20 and alloc.stats().demand_map_pages == 10
    assert alloc.acquire_pages([123, 124, 125])  # the scheduler opens the warm pages: nothing to map
    assert alloc.stats().demand_map_pages == 10
    assert rec.reserved_bytes == 10 * lay.logical_page_bytes
    alloc._last_acquire -= 60  # the pool has been quiet past the reclaim delay: the reserve goes too
    for p in alloc.idle_pages():
        alloc._idle_since[p] -= 60
    alloc.reclaim()
    assert alloc.idle_pages() == [] and rec.reserved_bytes == 8 * lay.logical_page_bytes
    alloc.close()
    rec.close()


def test_the_warm_reserve_stays_within_its_cap_and_the_limit(shm_dir, region_kind):
    lay, region, rec, alloc = _setup(region_kind, pages=128, reserve_pages=1,
                                     max_reserve_bytes=3 * (P * 2), reclaim_delay_s=30)  # 3 logical pages of 2 layers
    assert alloc.acquire_pages(list(range(8)))
    alloc._top_up()
    assert len(alloc.idle_pages()) == 3, "the cap, not the 8 pages of demand"
    alloc.close()
    rec.close()
    # A sixteenth of a 16-page limit is one page: the floor (reserve_pages=1), whatever the demand.
    lay, region, rec, alloc = _setup(region_kind, pages=32, limit_pages=16, reserve_pages=1, reclaim_delay_s=30)
    assert alloc.acquire_pages(list(range(8)))
    alloc._top_up()
    assert len(alloc.idle_pages()) == 1
    alloc.close()
    rec.close()


def test_the_warm_reserve_env_knob_names_its_fix(shm_dir, monkeypatch):
    monkeypatch.setenv("KVCACHED_MAX_RESERVE", "lots")
    with pytest.raises(ValueError, match="KVCACHED_MAX_RESERVE=.*e.g. KVCACHED_MAX_RESERVE=256M"):
        _setup("host")
    monkeypatch.setenv("KVCACHED_MAX_RESERVE", "64k")
    lay, region, rec, alloc = _setup("host")
    assert alloc.max_reserve_bytes == 64 << 10
    alloc.close()
    rec.close()


def test_idle_pages_wait_for_the_delay_then_go(shm_dir, region_kind):
    lay, region, rec, alloc = _setup(region_kind, reclaim_delay_s=0.2, background=True)
    assert alloc.acquire_pages([0])
    alloc.release_pages([0])
    assert mapped_pages(region) == {0, 8}, "an idle page stays mapped during the delay"
    assert alloc.acquire_pages([0]), "re-acquiring an idle page needs no map"
    alloc.release_pages([0])
    deadline = time.monotonic() + 5
    while mapped_pages(region) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mapped_pages(region) == set()
    assert rec.reserved_bytes == 0
    alloc.close()
    rec.close()


def test_warm_reserve_is_mapped_ahead_and_trim_drops_it(shm_dir, region_kind):
    lay, region, rec, alloc = _setup(region_kind, reserve_pages=2, reclaim_delay_s=30, background=True)
    assert alloc.acquire_pages([0])
    deadline = time.monotonic() + 5
    while alloc.stats().idle_pages < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert alloc.stats().idle_pages == 2
    assert rec.reserved_bytes == 3 * lay.logical_page_bytes and rec.used_bytes == lay.logical_page_bytes
    assert alloc.trim() == 2
    assert mapped_pages(region) == {0, 8}
    alloc.close()
    assert mapped_pages(region) == set() and rec.reserved_bytes == 0
    rec.close()


def test_budget_refusal_rolls_back(shm_dir, region_kind):
    lay, region, rec, alloc = _setup(region_kind, limit_pages=2)
    assert alloc.acquire_pages([0, 1])
    assert not alloc.acquire_pages([2, 3]), "over the limit: cannot allocate now"
    assert mapped_pages(region) == {0, 1, 8, 9}
    assert alloc.page_state(2) == "unmapped" and alloc.page_state(3) == "unmapped"
    assert rec.reserved_bytes == 2 * lay.logical_page_bytes
    alloc.close()
    rec.close()


def test_idle_pages_make_room_for_specific_pages(shm_dir, region_kind):
    lay, region, rec, alloc = _setup(region_kind, limit_pages=2, reclaim_delay_s=60)
    assert alloc.acquire_pages([0, 1])
    alloc.release_pages([1])
    assert alloc.acquire_pages([5]), "the idle page 1 is unmapped to make room"
    assert mapped_pages(region) == {0, 5, 8, 13}
    alloc.close()
    rec.close()


def test_memory_error_from_backend_rolls_back_everything(shm_dir):
    lay, region, rec, alloc = _setup("recording", reclaim_delay_s=60)
    assert alloc.acquire_pages([0])
    alloc.release_pages([0])  # idle, reused by the next call
    region.fail_next_map = True
    assert not alloc.acquire_pages([0, 1, 2])
    assert alloc.page_state(0) == "idle", "a reused idle page returns to idle on rollback"
    assert alloc.page_state(1) == "unmapped"
    assert rec.reserved_bytes == lay.logical_page_bytes and rec.used_bytes == 0
    alloc.close()
    rec.close()


def test_backend_is_never_called_under_the_allocator_lock(shm_dir):
    lay, region, rec, alloc = _setup("recording", reserve_pages=1, reclaim_delay_s=0.0, background=False)
    region.watched_lock = alloc._cond._lock  # type: ignore[attr-defined]
    for _ in range(5):
        pages = alloc.acquire(3)
        assert pages is not None
        alloc.release_pages(pages)
    alloc.trim()
    alloc.close()
    assert region.maps > 0 and region.calls_under_lock == 0
    rec.close()


def test_double_release_and_double_acquire_are_errors(shm_dir):
    lay, region, rec, alloc = _setup("recording")
    assert alloc.acquire_pages([0])
    with pytest.raises(ValueError, match="already in use"):
        alloc.acquire_pages([0])
    alloc.release_pages([0])
    with pytest.raises(ValueError, match="double release"):
        alloc.release_pages([0])
    alloc.close()
    rec.close()


def test_region_mismatch_names_the_fix(shm_dir):
    lay = KVLayout(num_blocks=8, block_bytes=P, page_size=P)
    rec = BudgetRecord.create(lay.region_size, name="m")
    with pytest.raises(ValueError, match="size=layout.region_size"):
        PageAllocator(lay, RecordingRegion(P, P), rec, background=False)
    rec.close()


def test_shrinking_limit_gives_back_idle_pages(shm_dir, region_kind):
    lay, region, rec, alloc = _setup(region_kind, reclaim_delay_s=60, reserve_pages=0)
    assert alloc.acquire_pages([0, 1, 2, 3])
    alloc.release_pages([2, 3])
    rec.set_limit(3 * lay.logical_page_bytes)
    assert alloc.reclaim() == 1
    assert rec.reserved_bytes == 3 * lay.logical_page_bytes
    assert alloc.acquire_pages([6]), "the last idle page makes room"
    assert not alloc.acquire_pages([7]), "growth is refused at the limit"
    assert rec.reserved_bytes == 3 * lay.logical_page_bytes
    rec.set_limit(8 * lay.logical_page_bytes)
    assert alloc.acquire_pages([7]), "the limit grew back"
    alloc.close()
    rec.close()

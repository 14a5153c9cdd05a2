"""KVCacheManager on the real host Region: placement, release rules, limits, a model check, and contention."""
import multiprocessing
import random
import threading
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from kvcached_testing import core_region_class, make_region, mapped_pages

from kvcached import budget
from kvcached.budget import BudgetRecord
from kvcached.kv_cache_manager import KVCacheManager
from kvcached.layout import KVLayout

P = 4096


def _manager(kind, lay, *, limit_pages=None, group=None, name="kv", **kw):
    region = make_region(kind, lay.region_size, P)
    limit = None if limit_pages is None else limit_pages * lay.logical_page_bytes
    rec = BudgetRecord.create(lay.num_logical_pages * lay.logical_page_bytes, name=name, group=group,
                              limit_bytes=limit, page_bytes=lay.logical_page_bytes)
    kw.setdefault("background", False)
    kw.setdefault("reserve_pages", 0)
    kw.setdefault("reclaim_delay_s", 0.0)
    return region, rec, KVCacheManager(lay, region, rec, **kw)


def test_alloc_fills_partly_used_pages_first(shm_dir, region_kind):
    lay = KVLayout(num_blocks=16, block_bytes=P // 4, num_layers=2, page_size=P)
    region, rec, kv = _manager(region_kind, lay)
    first = kv.alloc(3)
    assert first == [0, 1, 2]
    kv.free([1])
    assert kv.alloc(2) == [1, 3], "the hole and the rest of page 0 before a new page"
    assert mapped_pages(region) == {0, 4}
    assert kv.alloc(1) == [4]
    assert mapped_pages(region) == {0, 1, 4, 5}
    kv.close()
    rec.close()


def test_page_released_only_when_every_block_on_it_is_free(shm_dir, region_kind):
    lay = KVLayout(num_blocks=8, block_bytes=P // 4, page_size=P)
    region, rec, kv = _manager(region_kind, lay)
    blocks = kv.alloc(4)
    kv.free(blocks[:3])
    assert mapped_pages(region) == {0}
    kv.free(blocks[3:])
    assert mapped_pages(region) == set()
    assert kv.stats().reserved_bytes == 0
    kv.close()
    rec.close()


def test_blocks_larger_than_pages(shm_dir, region_kind):
    lay = KVLayout(num_blocks=4, block_bytes=3 * P, num_layers=2, page_size=P)
    region, rec, kv = _manager(region_kind, lay)
    assert kv.claim([1])
    assert mapped_pages(region) == {3, 4, 5, 15, 16, 17}
    assert kv.stats().used_bytes == 3 * lay.logical_page_bytes
    kv.free([1])
    assert mapped_pages(region) == set()
    kv.close()
    rec.close()


def test_claim_is_all_or_nothing_under_the_limit(shm_dir, region_kind):
    lay = KVLayout(num_blocks=16, block_bytes=P // 2, page_size=P)
    region, rec, kv = _manager(region_kind, lay, limit_pages=2)
    assert kv.claim([0, 2])
    assert not kv.claim([1, 4, 6]), "pages 2 and 3 would exceed the limit"
    assert not kv.is_live(1) and not kv.is_live(4)
    assert mapped_pages(region) == {0, 1}
    assert kv.claim([1, 3])
    with pytest.raises(ValueError, match="already live"):
        kv.claim([3])
    with pytest.raises(ValueError, match="not live"):
        kv.free([9])
    kv.close()
    rec.close()


def test_alloc_returns_none_when_memory_is_exhausted(shm_dir, region_kind):
    lay = KVLayout(num_blocks=16, block_bytes=P // 2, page_size=P)
    region, rec, kv = _manager(region_kind, lay, limit_pages=3)
    assert kv.available_blocks() == 6
    assert len(kv.alloc(6)) == 6
    assert kv.alloc(1) is None
    assert kv.available_blocks() == 0
    kv.resize(5 * lay.logical_page_bytes)
    assert kv.available_blocks() == 4
    assert kv.alloc(4) is not None
    kv.close()
    rec.close()


def test_resize_shrinks_and_grows_back(shm_dir, region_kind):
    lay = KVLayout(num_blocks=16, block_bytes=P, page_size=P)
    region, rec, kv = _manager(region_kind, lay, reclaim_delay_s=60)
    blocks = kv.alloc(8)
    kv.free(blocks[4:])  # four idle pages stay mapped (long delay)
    assert kv.stats().reserved_pages == 8
    kv.resize(5 * P)
    s = kv.stats()
    assert s.reserved_bytes == 5 * P and s.limit_bytes == 5 * P, "idle pages given back down to the limit"
    assert kv.available_blocks() == 1
    assert kv.alloc(2) is None
    kv.resize(16 * P)
    assert kv.alloc(8) is not None
    assert kv.stats().reserved_bytes == 12 * P
    kv.close()
    rec.close()


def test_available_blocks_respects_group_cap(shm_dir, region_kind):
    lay = KVLayout(num_blocks=16, block_bytes=P, page_size=P)
    r1, rec1, kv1 = _manager(region_kind, lay, group="shared", name="a")
    r2, rec2, kv2 = _manager(region_kind, lay, group="shared", name="b")
    budget.set_group_limit("shared", 10 * P)
    assert kv1.alloc(6) is not None
    assert kv2.available_blocks() == 4
    assert kv2.alloc(5) is None
    assert kv2.alloc(4) is not None
    kv1.free(list(range(6)))
    assert kv2.alloc(6) is not None, "b grows into what a released"
    for kv, rec in ((kv1, rec1), (kv2, rec2)):
        kv.close()
        rec.close()


def test_two_pools_in_one_process_have_separate_records(shm_dir, region_kind):
    lay = KVLayout(num_blocks=8, block_bytes=P, page_size=P)
    r1, rec1, kv1 = _manager(region_kind, lay, name="same")
    r2, rec2, kv2 = _manager(region_kind, lay, name="same")
    assert rec1.name != rec2.name
    kv1.alloc(3)
    kv2.alloc(1)
    by_name = {i.name: i for i in budget.list_instances()}
    assert by_name[rec1.name].used_bytes == 3 * P and by_name[rec2.name].used_bytes == P
    for kv, rec in ((kv1, rec1), (kv2, rec2)):
        kv.close()
        rec.close()
    assert budget.list_instances() == []


# Model-based check ------------------------------------------------------------------------------------------

class ManagerMachine(RuleBasedStateMachine):
    """The manager against a set of live blocks, on a real host Region with 4 KiB pages."""

    def __init__(self) -> None:
        super().__init__()
        self.live: set[int] = set()

    @initialize(shape=st.sampled_from([(24, P // 4, 2), (12, P // 2 * 3, 1), (6, 2 * P, 2)]),
                limit_pages=st.integers(2, 12))
    def setup(self, shape, limit_pages):
        num_blocks, block_bytes, layers = shape
        self.lay = KVLayout(num_blocks=num_blocks, block_bytes=block_bytes, num_layers=layers, page_size=P)
        self.region = make_region("host", self.lay.region_size, P)
        self.rec = BudgetRecord.create(self.lay.num_logical_pages * self.lay.logical_page_bytes, name="model",
                                       limit_bytes=limit_pages * self.lay.logical_page_bytes,
                                       page_bytes=self.lay.logical_page_bytes)
        self.kv = KVCacheManager(self.lay, self.region, self.rec, background=False, reserve_pages=0,
                                 reclaim_delay_s=3600)

    @rule(n=st.integers(1, 6))
    def alloc(self, n):
        before = self.rec.reserved_bytes
        got = self.kv.alloc(n)
        if got is None:
            assert self.rec.reserved_bytes <= max(before, self.rec.limit_bytes)
            return
        assert len(got) == n and len(set(got)) == n
        assert not set(got) & self.live, "a live block was handed out twice"
        self.live |= set(got)

    @rule(data=st.data())
    def claim(self, data):
        blocks = data.draw(st.sets(st.integers(0, self.lay.num_blocks - 1), min_size=1, max_size=4))
        blocks -= self.live
        if blocks and self.kv.claim(blocks):
            self.live |= blocks

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        blocks = data.draw(st.sets(st.sampled_from(sorted(self.live)), min_size=1))
        self.kv.free(blocks)
        self.live -= blocks

    @rule()
    def trim(self):
        self.kv.trim()

    @rule(pages=st.integers(0, 12))
    def resize(self, pages):
        self.kv.resize(pages * self.lay.logical_page_bytes)

    @invariant()
    def accounting(self):
        if not hasattr(self, "kv"):
            return
        assert {b for b in range(self.lay.num_blocks) if self.kv.is_live(b)} == self.live
        holding = {g for b in self.live for g in self.lay.pages_of_block(b)}
        idle = set(self.kv.allocator.idle_pages())
        assert not holding & idle
        expected = {r for g in holding | idle for r in self.lay.region_pages(g)}
        assert mapped_pages(self.region) == expected, "mapped iff holding a live block or idle (warm)"
        s = self.kv.stats()
        assert s.used_pages == len(holding) and s.reserved_pages == len(holding | idle)
        assert s.reserved_bytes == len(holding | idle) * self.lay.logical_page_bytes
        assert s.reserved_bytes <= s.limit_bytes or not idle, "idle pages above the limit are given back"

    def teardown(self):
        if hasattr(self, "kv"):
            self.kv.close()
            assert mapped_pages(self.region) == set()
            self.region.close()
            self.rec.close()


@pytest.mark.skipif(core_region_class() is None, reason="needs kvcached._core.Region: run `pip install -e .[test]`")
def test_manager_matches_model(shm_dir):
    ManagerMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow])
    ManagerMachine.TestCase().runTest()


# Contention across processes --------------------------------------------------------------------------------

CAP_PAGES = 10


def _contend(seed: int, seconds: float, result: "multiprocessing.Queue") -> None:
    from kvcached import _core
    lay = KVLayout(num_blocks=64, block_bytes=P // 4, num_layers=2, page_size=P)
    region = _core.Region(lay.region_size, P, backend="host")
    rec = BudgetRecord.create(lay.num_logical_pages * lay.logical_page_bytes, name=f"worker{seed}",
                              group="contend", page_bytes=lay.logical_page_bytes)
    kv = KVCacheManager(lay, region, rec, reserve_pages=1, reclaim_delay_s=0.02)
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def churn(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        mine: list[int] = []
        try:
            while time.monotonic() < stop:
                if mine and rng.random() < 0.5:
                    rng.shuffle(mine)
                    cut = rng.randint(1, len(mine))
                    kv.free(mine[:cut])
                    mine = mine[cut:]
                elif rng.random() < 0.5:
                    got = kv.alloc(rng.randint(1, 6))
                    mine += got or []
                else:
                    want = {rng.randrange(64) for _ in range(rng.randint(1, 3))}
                    try:
                        if kv.claim(want):
                            mine += sorted(want)
                    except ValueError:
                        pass  # another thread holds one of them: the engine would not ask for it
            kv.free(mine)
        except Exception as exc:  # report to the parent, which fails the test
            errors.append(repr(exc))

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kv.close()
    leaked = list(region.resident_pages())
    result.put((seed, errors, leaked, rec.reserved_bytes, rec.used_bytes))
    region.close()
    rec.close()


@pytest.mark.skipif(core_region_class() is None, reason="needs kvcached._core.Region: run `pip install -e .[test]`")
def test_group_cap_holds_under_contention(shm_dir):
    page_bytes = 2 * P
    cap = CAP_PAGES * page_bytes
    budget.set_group_limit("contend", cap, create=True)
    ctx = multiprocessing.get_context("fork")
    result = ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(seed, 1.5, result)) for seed in range(4)]
    peak = 0
    samples = 0
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs) or samples == 0:
        peak = max(peak, budget.group_reserved("contend"))
        samples += 1
        time.sleep(0.002)
    reports = [result.get(timeout=10) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    assert samples > 10
    assert 0 < peak <= cap, f"group reserved peaked at {peak} over the cap {cap}"
    for seed, errors, leaked, reserved, used in reports:
        assert errors == [], f"worker {seed}: {errors}"
        assert leaked == [] and reserved == 0 and used == 0, f"worker {seed} leaked"
    assert budget.list_instances(group="contend") == []

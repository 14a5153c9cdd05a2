"""KVCacheManager on the cuda backend: random operation sequences keep mapping, budget and data consistent,
and the unmapped-page policy of csrc/cuda_backend.cpp holds (only live blocks are read, the null block's
page stays mapped, an access to an unmapped page faults rather than reading a hidden zero page).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcached import _core
from kvcached.budget import BudgetRecord
from kvcached.kv_cache_manager import KVCacheManager
from kvcached.layout import KVLayout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _core.cuda_available(),
        reason="no CUDA GPU here: the cuda backend needs libcuda.so.1 and a visible NVIDIA device",
    ),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def records_dir():
    """A private KVCACHED_SHM_DIR for the module (hypothesis examples share it; each closes its record)."""
    path = tempfile.mkdtemp(prefix="kvcached-gpu-mgr-", dir="/dev/shm")
    old = os.environ.get("KVCACHED_SHM_DIR")
    os.environ["KVCACHED_SHM_DIR"] = path
    yield path
    if old is None:
        del os.environ["KVCACHED_SHM_DIR"]
    else:
        os.environ["KVCACHED_SHM_DIR"] = old
    shutil.rmtree(path, ignore_errors=True)


class TaggedPool:
    """A manager over a cuda region whose live blocks each hold a tag written by a torch kernel."""

    def __init__(self, torch, layout: KVLayout, name: str) -> None:
        self.torch = torch
        self.layout = layout
        self.region = _core.Region(layout.region_size, layout.page_size, backend="cuda")
        self.record = BudgetRecord.create(layout.num_logical_pages * layout.logical_page_bytes, name=name,
                                          page_bytes=layout.logical_page_bytes, backend="cuda")
        # No warm reserve, no reclaim delay: every free unmaps at once, so the mapping is checkable exactly.
        self.kv = KVCacheManager(layout, self.region, self.record, reserve_pages=0, reclaim_delay_s=0.0,
                                 background=False)
        stride_words = layout.stride // 4
        words = torch.from_dlpack(self.region).view(torch.int32).view(layout.num_layers, stride_words)
        # [layer, block, word]: slicing and viewing touch no memory, only kernels on chosen blocks do.
        self.blocks = words[:, : layout.num_blocks * layout.block_bytes // 4].view(
            layout.num_layers, layout.num_blocks, layout.block_bytes // 4)
        self.tags: dict[int, int] = {}
        self._next_tag = 1

    def tag(self, blocks: list[int]) -> None:
        for b in blocks:
            self.tags[b] = self._next_tag
            self.blocks[:, b].fill_(self._next_tag)
            self._next_tag += 1

    def expected_region_pages(self) -> set[int]:
        logical = {p for b in self.tags for p in self.layout.pages_of_block(b)}
        return {rp for p in logical for rp in self.layout.region_pages(p)}

    def check(self) -> None:
        torch = self.torch
        assert set(self.region.resident_pages()) == self.expected_region_pages()
        # The budget accounts exactly the device memory held: pages mapped, and handles kept in the pool for the
        # next map (pooled handles are device memory too, so a neighbour's cap sees them).
        assert self.region.backing_bytes == self.record.reserved_bytes
        if self.tags:
            ids = torch.tensor(sorted(self.tags), device="cuda")
            want = torch.tensor([self.tags[b] for b in sorted(self.tags)], device="cuda", dtype=torch.int32)
            got = self.blocks.index_select(1, ids)  # reads live blocks only
            assert bool(got.eq(want.view(1, -1, 1)).all()), "a live block lost its data"

    def close(self) -> None:
        self.kv.close()
        assert self.region.resident_pages() == []
        self.record.close()
        self.region.close()


OPS = st.lists(st.tuples(st.sampled_from(["alloc", "free", "claim", "limit"]), st.integers(1, 8),
                         st.integers(0, 2**16)), min_size=1, max_size=25)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(quarters=st.sampled_from([1, 3, 4, 6]), ops=OPS)
def test_manager_on_cuda_keeps_mapping_budget_and_data_consistent(torch_cuda, records_dir, quarters, ops) -> None:
    import random

    gran = _core.granularity("cuda", 0)
    # Blocks of 1/4, 3/4, 1 and 3/2 pages: several per page, straddling pages, and spanning two.
    layout = KVLayout(num_blocks=24, block_bytes=gran * quarters // 4, num_layers=2, page_size=gran)
    pool = TaggedPool(torch_cuda, layout, "hypo")
    try:
        for kind, n, seed in ops:
            rng = random.Random(seed)
            if kind == "alloc":
                got = pool.kv.alloc(n)
                if got is not None:
                    assert len(got) == n and not set(got) & set(pool.tags)
                    pool.tag(got)
                else:  # refused only by the pool size or the limit, never for no reason
                    assert n > layout.num_blocks - len(pool.tags) or pool.record.limit_bytes < pool.record.virtual_bytes
            elif kind == "free" and pool.tags:
                victims = rng.sample(sorted(pool.tags), min(n, len(pool.tags)))
                pool.kv.free(victims)
                for b in victims:
                    del pool.tags[b]
            elif kind == "claim":
                free = [b for b in range(layout.num_blocks) if b not in pool.tags]
                want = rng.sample(free, min(n, len(free)))
                if pool.kv.claim(want):
                    pool.tag(want)
                else:
                    assert pool.record.limit_bytes < pool.record.virtual_bytes
            elif kind == "limit":
                # Shrinking the limit below what is held refuses growth but never unmaps live blocks.
                pool.kv.resize((n + 2) * layout.logical_page_bytes if n < 8 else pool.record.virtual_bytes)
            torch_cuda.cuda.synchronize()
            pool.check()
    finally:
        pool.close()


def test_only_live_blocks_are_read_and_the_null_block_page_stays_mapped(torch_cuda, records_dir) -> None:
    torch = torch_cuda
    gran = _core.granularity("cuda", 0)
    layout = KVLayout(num_blocks=64, block_bytes=gran // 8, num_layers=2, page_size=gran)
    pool = TaggedPool(torch, layout, "nullblock")
    try:
        assert pool.kv.claim([0])  # the engine's null block, as the vLLM integration claims it
        pool.tag([0])
        requests = [pool.kv.alloc(12), pool.kv.alloc(12), pool.kv.alloc(12)]
        assert all(r is not None for r in requests)
        for r in requests:
            pool.tag(r)
        for r in requests[:2]:
            pool.kv.free(r)
            for b in r:
                del pool.tags[b]
        pool.kv.trim()
        torch.cuda.synchronize()
        pool.check()
        mapped = set(pool.region.resident_pages())
        assert len(mapped) < pool.region.num_pages  # freed requests' pages really went back
        # A block table padded to a fixed width with the null block, as an attention kernel reads it.
        table = torch.tensor(sorted(requests[2]) + [0] * 8, device="cuda")
        for b in table.tolist():
            for p in layout.pages_of_block(b):
                assert set(layout.region_pages(p)) <= mapped, f"block {b} would be read from an unmapped page"
        rows = pool.blocks.index_select(1, table)[:, :, 0]
        want = torch.tensor([pool.tags[b] for b in table.tolist()], device="cuda", dtype=torch.int32)
        assert torch.equal(rows, want.expand(layout.num_layers, -1))
        pool.kv.free(requests[2])
        for b in requests[2]:
            del pool.tags[b]
        pool.kv.trim()
        null_pages = {rp for p in layout.pages_of_block(0) for rp in layout.region_pages(p)}
        assert set(pool.region.resident_pages()) == null_pages  # only the null block's page, in every layer
        assert bool(pool.blocks[:, 0].eq(pool.tags[0]).all())
    finally:
        pool.close()


FAULT_PROBE = textwrap.dedent("""
    import torch
    from kvcached import _core
    gran = _core.granularity("cuda", 0)
    region = _core.Region(2 * gran, gran, backend="cuda")
    region.map([0])
    mem = torch.from_dlpack(region)
    mem[:gran].fill_(3)
    print("mapped-ok", int(mem[:gran].to(torch.int64).sum()) == 3 * gran, flush=True)
    region.unmap([0])
    region.map([1])
    mem[:gran].sum().item()  # page 0 is unmapped now: no zero page behind it
    torch.cuda.synchronize()
    print("read-unmapped-ok", flush=True)
""")


def test_reading_an_unmapped_page_faults_in_a_separate_process(torch_cuda) -> None:
    """Run in a child: an illegal-address fault poisons the CUDA context of the process that takes it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", FAULT_PROBE], capture_output=True, text=True, timeout=180, env=env)
    assert "mapped-ok True" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode != 0 and "read-unmapped-ok" not in proc.stdout, \
        "reading an unmapped page did not fault: a zero page or stale mapping hides unmapped accesses"
    assert "illegal" in proc.stderr.lower(), proc.stderr[-3000:]

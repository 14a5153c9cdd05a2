"""A paged-attention engine in miniature, with no vLLM: the same request stream runs on a K/V pool backed by a
kvcached cuda region (blocks allocated and freed through KVCacheManager as requests come and go, so pages
are mapped and unmapped under the running batch) and on a static torch buffer. Every decode step's attention
output must be bit-for-bit equal between the two.

Run as a script (`python tests/gpu/test_mini_engine.py`) it prints the run's figures as JSON; under pytest
it asserts them.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

if __name__ == "__main__":  # run as a script from anywhere: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvcached import _core  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _core.cuda_available(),
        reason="no CUDA GPU here: the cuda backend needs libcuda.so.1 and a visible NVIDIA device",
    ),
]

NUM_LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 16, 128, 16, 512  # 128 KiB blocks, 16 per 2 MiB page
NULL_BLOCK = 0  # pads block tables, as in vLLM; claimed first so its page stays mapped


def _attention(pool_l, tables, ctx_lens, q, torch):
    """One layer of paged attention over padded block tables: pool_l is [blocks, 2, block_size, heads, dim]."""
    b, width = tables.shape
    kv = pool_l[tables]  # [B, width, 2, bs, H, D]; padding entries read the (mapped) null block
    k = kv[:, :, 0].reshape(b, width * BLOCK_SIZE, HEADS, HEAD_DIM)
    v = kv[:, :, 1].reshape(b, width * BLOCK_SIZE, HEADS, HEAD_DIM)
    valid = torch.arange(width * BLOCK_SIZE, device=q.device).view(1, -1) < ctx_lens.view(-1, 1)  # [B, T]
    # Slots past a request's length hold whatever the page held before; a kernel never uses them, so neither
    # do we (a fresh physical page may hold NaN bit patterns, and 0 * NaN is NaN).
    v = torch.where(valid.view(b, -1, 1, 1), v, torch.zeros((), dtype=v.dtype, device=v.device))
    scores = torch.einsum("bhd,bthd->bht", q.float(), k.float()) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(~valid.view(b, 1, -1), float("-inf"))
    return torch.einsum("bht,bthd->bhd", scores.softmax(-1), v.float()).to(q.dtype)


def run_mini_engine(steps: int = 300, seed: int = 0, max_running: int = 8, burst_steps: int = 50) -> dict:
    """Drive both pools with one seeded request stream; returns figures and whether every output matched.

    Arrivals come in bursts of `burst_steps` separated by quiet spells as long, so the batch drains and its
    pages are unmapped while later requests still run, then are mapped again by the next burst.
    """
    import torch

    from kvcached.budget import BudgetRecord
    from kvcached.kv_cache_manager import KVCacheManager
    from kvcached.layout import KVLayout

    dev = torch.device("cuda", 0)
    dtype = torch.float16
    gran = _core.granularity("cuda", 0)
    block_bytes = 2 * BLOCK_SIZE * HEADS * HEAD_DIM * 2  # K and V of one block in one layer
    layout = KVLayout(num_blocks=NUM_BLOCKS, block_bytes=block_bytes, num_layers=NUM_LAYERS, page_size=gran)
    shape = (NUM_LAYERS, layout.stride // block_bytes, 2, BLOCK_SIZE, HEADS, HEAD_DIM)
    shm = tempfile.mkdtemp(prefix="kvcached-mini-engine-", dir="/dev/shm")
    old_shm = os.environ.get("KVCACHED_SHM_DIR")
    os.environ["KVCACHED_SHM_DIR"] = shm
    region = _core.Region(layout.region_size, gran, backend="cuda")
    record = BudgetRecord.create(layout.num_logical_pages * layout.logical_page_bytes, name="mini-engine",
                                 page_bytes=layout.logical_page_bytes, backend="cuda")
    kv = KVCacheManager(layout, region, record, reserve_pages=0, reclaim_delay_s=0.0, background=False)
    elastic = torch.from_dlpack(region).view(dtype).view(shape)
    static = torch.zeros(shape, dtype=dtype, device=dev)
    rng = random.Random(seed)
    gen = torch.Generator(device=dev).manual_seed(seed)
    figures = {"steps": steps, "requests_started": 0, "requests_finished": 0, "mismatched_steps": 0,
               "max_running": 0, "map_events": 0, "unmap_events": 0, "min_mapped_pages": None,
               "max_mapped_pages": 0, "alloc_refusals": 0, "drains": 0}
    running: list[dict] = []

    def write(blocks: list[int], positions: range) -> None:
        """New K/V for `positions`, the same values into both pools."""
        pos = torch.tensor(list(positions), device=dev)
        table = torch.tensor(blocks, device=dev)
        blk, off = table[pos // BLOCK_SIZE], pos % BLOCK_SIZE
        values = torch.randn((len(positions), NUM_LAYERS, 2, HEADS, HEAD_DIM), generator=gen, device=dev,
                             dtype=dtype)
        for pool in (elastic, static):
            for layer in range(NUM_LAYERS):
                pool[layer][blk, :, off] = values[:, layer]

    try:
        assert kv.claim([NULL_BLOCK])
        last_mapped = region.num_mapped
        null_pages = NUM_LAYERS * len(layout.pages_of_block(NULL_BLOCK))
        for step in range(steps):
            # Arrivals, during bursts: a prompt of 32..700 tokens is prefilled into fresh blocks.
            bursting = (step // burst_steps) % 2 == 0
            if bursting and len(running) < max_running and rng.random() < 0.5:
                prompt = rng.randint(32, 700)
                blocks = kv.alloc(-(-prompt // BLOCK_SIZE))
                if blocks is None:
                    figures["alloc_refusals"] += 1
                else:
                    write(blocks, range(prompt))
                    running.append({"blocks": blocks, "len": prompt, "left": rng.randint(5, 40)})
                    figures["requests_started"] += 1
            if running:
                # Decode: each request appends one token (a new block at a boundary), then attends.
                for r in running:
                    if r["len"] % BLOCK_SIZE == 0:
                        more = kv.alloc(1)
                        if more is None:
                            raise MemoryError("the mini engine ran out of blocks: lower max_running")
                        r["blocks"] += more
                    write(r["blocks"], range(r["len"], r["len"] + 1))
                    r["len"] += 1
                width = max(len(r["blocks"]) for r in running)
                tables = torch.tensor([r["blocks"] + [NULL_BLOCK] * (width - len(r["blocks"])) for r in running],
                                      device=dev)
                ctx = torch.tensor([r["len"] for r in running], device=dev)
                q = torch.randn((len(running), NUM_LAYERS, HEADS, HEAD_DIM), generator=gen, device=dev, dtype=dtype)
                outs = [torch.stack([_attention(pool[layer], tables, ctx, q[:, layer], torch)
                                     for layer in range(NUM_LAYERS)]) for pool in (elastic, static)]
                if not torch.equal(outs[0], outs[1]):
                    figures["mismatched_steps"] += 1
                figures["max_running"] = max(figures["max_running"], len(running))
            # Departures: finished requests free their blocks; pages they emptied are unmapped now.
            done = [r for r in running if r["left"] <= 1]
            for r in running:
                r["left"] -= 1
            for r in done:
                kv.free(r["blocks"])
                running.remove(r)
                figures["requests_finished"] += 1
            mapped = region.num_mapped
            figures["map_events"] += mapped > last_mapped
            figures["unmap_events"] += mapped < last_mapped
            figures["drains"] += mapped == null_pages < last_mapped  # back to the null block's page alone
            last_mapped = mapped
            figures["max_mapped_pages"] = max(figures["max_mapped_pages"], mapped)
            if figures["min_mapped_pages"] is None or mapped < figures["min_mapped_pages"]:
                figures["min_mapped_pages"] = mapped
        torch.cuda.synchronize()
        for r in running:
            kv.free(r["blocks"])
        figures["pages_after_drain"] = region.num_mapped
        figures["null_block_pages"] = null_pages
        figures["region_pages"] = region.num_pages
        figures["page_mib"] = gran >> 20
        figures["equal"] = figures["mismatched_steps"] == 0
    finally:
        kv.close()
        record.close()
        region.close()
        if old_shm is None:
            os.environ.pop("KVCACHED_SHM_DIR", None)
        else:
            os.environ["KVCACHED_SHM_DIR"] = old_shm
        shutil.rmtree(shm, ignore_errors=True)
    return figures


def test_paged_attention_on_elastic_pages_equals_a_static_pool() -> None:
    torch = pytest.importorskip("torch", reason="the mini engine's attention runs in torch")
    if not torch.cuda.is_available():
        pytest.skip("torch in this environment has no CUDA support (a CPU build): install a CUDA torch to run this")
    f = run_mini_engine()
    assert f["requests_finished"] >= 5 and f["max_running"] >= 3
    assert f["map_events"] >= 3 and f["unmap_events"] >= 3, "pages hardly came and went: the check proves little"
    assert f["drains"] >= 2  # whole bursts' pages went back mid-run and were mapped again after
    assert f["max_mapped_pages"] < f["region_pages"]
    assert f["pages_after_drain"] == f["null_block_pages"]
    assert f["mismatched_steps"] == 0, f


if __name__ == "__main__":
    print(json.dumps(run_mini_engine(), indent=2))

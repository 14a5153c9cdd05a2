"""BlockCopier, the connector's data path, on host tensors: in place for a block-first layout (vLLM-CPU), through the
staging buffers for a layout whose blocks are strided (K and V kept apart first). The GPU tier runs the same on a
device (tests/gpu/test_prefix_blocks_cuda.py)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is needed for KV tensors: run `make setup`")

from kvcached.prefix_blocks import BlockCopier  # noqa: E402
from kvcached.prefix_store import PrefixStore, model_fingerprint  # noqa: E402

LAYERS, BLOCKS = 3, 8


@pytest.mark.parametrize("layout", ["blocks-first", "kv-first"])
def test_blocks_round_trip_through_the_store(shm_dir, layout):
    shape = (BLOCKS, 2, 4, 16) if layout == "blocks-first" else (2, BLOCKS, 4, 16)
    block_dim = 0 if layout == "blocks-first" else 1
    src = [torch.randn(shape, dtype=torch.float16) for _ in range(LAYERS)]
    dst = [torch.zeros(shape, dtype=torch.float16) for _ in range(LAYERS)]
    part = src[0].select(block_dim, 0).numel() * 2
    fingerprint = model_fingerprint(model="m", dtype="float16", layers=LAYERS, block_bytes=part)
    store = PrefixStore.open(f"blocks-{layout}", fingerprint, max_bytes=1 << 20)
    saver, loader = BlockCopier(src, block_dim, part), BlockCopier(dst, block_dim, part)
    assert saver.save(store, "ab" * 16, 5)
    assert loader.load(store, "ab" * 16, 2)
    for s, d in zip(src, dst):
        assert torch.equal(d.select(block_dim, 2), s.select(block_dim, 5))
        assert not d.select(block_dim, 5).any(), "no other block was written"
    assert not loader.load(store, "cd" * 16, 3), "a missing chunk is a miss, not an error"

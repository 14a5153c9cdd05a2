"""The prefix connector's data path on a GPU without an engine: whole KV blocks of device tensors saved to a prefix
store and loaded back into other blocks (through pinned staging buffers), exactly; a missing chunk is a miss. Prints
the load throughput against a plain host-to-device copy of the same bytes (a figure for the closing notes, not a
test condition)."""
from __future__ import annotations

import json
import time

import pytest

from kvcached.prefix_blocks import BlockCopier
from kvcached.prefix_store import PrefixStore, model_fingerprint

pytestmark = pytest.mark.gpu

LAYERS, BLOCKS = 8, 64


@pytest.mark.parametrize("layout", ["kv-first", "blocks-first"])
def test_device_blocks_round_trip_through_the_store(torch_cuda, layout):
    torch = torch_cuda
    # kv-first: vLLM's flash-attention layout [2, blocks, block_size, heads, head_size]; blocks-first: FlashInfer's.
    shape = (2, BLOCKS, 16, 8, 128) if layout == "kv-first" else (BLOCKS, 2, 16, 8, 128)
    block_dim = 1 if layout == "kv-first" else 0
    src = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]
    dst = [torch.zeros(shape, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]
    part = src[0].select(block_dim, 0).numel() * src[0].element_size()
    fingerprint = model_fingerprint(model="gpu-test", dtype="bfloat16", layers=LAYERS, block_bytes=part, layout=layout)
    store = PrefixStore.open(f"gpu-{layout}", fingerprint, max_bytes=1 << 30)  # under $KVCACHED_SHM_DIR
    saver, loader = BlockCopier(src, block_dim, part), BlockCopier(dst, block_dim, part)
    keys = [f"{i:032x}" for i in range(16)]
    for i, key in enumerate(keys):
        assert saver.save(store, key, i)
    assert loader.load(store, keys[0], 63)  # allocates the pinned staging buffers: a one-time cost, not timed
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, key in enumerate(keys):
        assert loader.load(store, key, 32 + i)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    for s, d in zip(src, dst):
        assert torch.equal(d.narrow(block_dim, 32, 16), s.narrow(block_dim, 0, 16))
    assert not loader.load(store, "f" * 32, 5), "a missing chunk is a miss"
    nbytes = len(keys) * LAYERS * part
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    copy_s = time.perf_counter() - t0
    print(json.dumps({"layout": layout, "bytes": nbytes, "store_load_gb_s": nbytes / load_s / 1e9,
                      "pinned_h2d_gb_s": nbytes / copy_s / 1e9, "ratio": copy_s / load_s}))

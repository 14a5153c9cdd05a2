"""vLLM 0.25/0.26's KV allocation (one tensor per KVCacheTensor), paged by kvcached.

Those releases are GPU-only wheels pinning torch 2.11, so they cannot be imported here: their config classes and the
call shape of their V2 model runner's `init_kv_cache` are TEST DOUBLES below, copied field for field from 0.26's
source (`vllm/v1/kv_cache_interface.py`, `vllm/v1/worker/gpu/attn_utils.py`); tests/unit/test_vllm_versions.py checks
statically that those hook targets are where the doubles assume. The regions are real (host backend), and docs/gpu.md
records the same code serving on a GPU.
"""
from __future__ import annotations

import os
import time
import types
from dataclasses import dataclass, field

import pytest

torch = pytest.importorskip("torch", reason="torch comes with vLLM: run `make setup`")

from kvcached.integration.vllm import worker as vllm_worker  # noqa: E402
from kvcached.integration.vllm.layout import UnsupportedLayout, plan_pool  # noqa: E402

PAGE = 64 * 1024
BLOCK = 16 * 1024  # one layer's block: 16 tokens x 2 KV heads x 64 x bf16 x K and V


@dataclass
class KVCacheTensor026:  # TEST DOUBLE of vllm 0.26's KVCacheTensor
    size: int
    shared_by: list[str]
    offset: int = 0
    block_stride: int = 0


@dataclass
class KVCacheConfig026:  # TEST DOUBLE of vllm 0.26's KVCacheConfig (the fields kvcached reads)
    num_blocks: int
    kv_cache_tensors: list[KVCacheTensor026]
    kv_cache_groups: list = field(default_factory=list)


def _names(layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(layers)]


def _unpacked(num_blocks: int = 37, layers: int = 4) -> KVCacheConfig026:
    return KVCacheConfig026(num_blocks, [KVCacheTensor026(BLOCK * num_blocks, [n]) for n in _names(layers)])


def _packed(num_blocks: int = 37, layers: int = 4) -> KVCacheConfig026:
    return KVCacheConfig026(num_blocks, [KVCacheTensor026(BLOCK * layers * num_blocks, [n], offset=i * BLOCK,
                                                          block_stride=BLOCK * layers)
                                         for i, n in enumerate(_names(layers))])


def test_each_layers_tensor_starts_on_a_page_so_a_logical_page_holds_whole_blocks():
    plan = plan_pool(_unpacked(num_blocks=37), None, PAGE)
    stride = plan.layout.stride
    assert stride % PAGE == 0 and stride >= 37 * BLOCK
    assert plan.tensor_offsets == (0, stride, 2 * stride, 3 * stride)
    assert plan.layout.num_layers == 4 and plan.layout.block_bytes == BLOCK
    assert plan.buffer_size == 4 * stride
    # Block 5 is at 5 * BLOCK inside every layer's tensor: one logical page covers it in all four.
    page = plan.layout.pages_of_block(5)[0]
    assert plan.layout.region_pages(page) == [i * stride // PAGE + 5 * BLOCK // PAGE for i in range(4)]


def test_a_packed_config_is_one_block_outermost_backing():
    plan = plan_pool(_packed(num_blocks=37), None, PAGE)
    assert plan.layout.num_layers == 1 and plan.layout.block_bytes == 4 * BLOCK
    assert plan.tensor_offsets == (0, 0, 0, 0)
    assert plan.buffer_size % PAGE == 0 and plan.buffer_size >= 37 * 4 * BLOCK


@pytest.mark.parametrize("config,match", [
    (KVCacheConfig026(8, [KVCacheTensor026(8 * BLOCK, ["a"]), KVCacheTensor026(16 * BLOCK, ["b"])]), "sizes"),
    (KVCacheConfig026(8, [KVCacheTensor026(8 * BLOCK + 3, ["a"])]), "whole blocks"),
    (KVCacheConfig026(8, [KVCacheTensor026(8 * BLOCK, ["a"], block_stride=BLOCK), KVCacheTensor026(8 * BLOCK, ["b"])]),
     "mixed"),
])
def test_configs_it_cannot_page_are_refused_with_the_reason(config, match):
    with pytest.raises(UnsupportedLayout, match=match):
        plan_pool(config, None, PAGE)


@pytest.fixture
def shm_dir(monkeypatch):
    directory = f"/dev/shm/kvcached-test-{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv("KVCACHED_SHM_DIR", directory)
    monkeypatch.setenv("KVCACHED_INSTANCE", f"unit-{os.getpid()}")
    monkeypatch.setenv("KVCACHED_IPC_NAME", f"unit-{os.getpid()}")
    monkeypatch.setenv("KVCACHED_PAGE_SIZE", str(PAGE))
    yield directory
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def opened_regions():
    before = list(vllm_worker._regions)
    yield
    for region in [r for r in vllm_worker._regions if r not in before]:
        vllm_worker._regions.remove(region)
        region.close()


def test_every_layers_tensor_is_a_slice_of_one_region_that_holds_memory_only_when_mapped(shm_dir, opened_regions):
    config = _unpacked(num_blocks=37)
    raw = vllm_worker.region_backed_kv_tensors(config, torch.device("cpu"))
    region = vllm_worker._regions[-1]
    plan = plan_pool(config, None, PAGE)
    assert set(raw) == set(_names(4))
    for i, name in enumerate(_names(4)):
        assert raw[name].dtype == torch.int8 and raw[name].numel() == 37 * BLOCK
        assert raw[name].data_ptr() - region.address == plan.tensor_offsets[i]
    assert region.resident_pages() == []
    # What the scheduler maps for block 5 is exactly what writing block 5 in every layer needs.
    region.map(plan.layout.region_pages(plan.layout.pages_of_block(5)[0]))
    for name in _names(4):
        raw[name][5 * BLOCK:6 * BLOCK].fill_(7)
    assert sorted(region.resident_pages()) == sorted(plan.layout.region_pages(plan.layout.pages_of_block(5)[0]))


def test_a_packed_config_gives_every_layer_the_same_backing(shm_dir, opened_regions):
    raw = vllm_worker.region_backed_kv_tensors(_packed(num_blocks=37), torch.device("cpu"))
    assert len({t.data_ptr() for t in raw.values()}) == 1
    assert len({t.numel() for t in raw.values()}) == 1


class _Backend:  # TEST DOUBLE of an attention backend: a shape and a stride order, as vLLM 0.26's backends give them
    def __init__(self, name: str, shape, order):
        self.__name__, self._shape, self._order = name, shape, order

    def get_kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        return self._shape(num_blocks, block_size, num_kv_heads, head_size)

    def get_kv_cache_stride_order(self, include_num_layers_dimension=False):
        return self._order


FLASH_ATTN = _Backend("FLASH_ATTN", lambda b, n, h, d: (b, h, n, 2 * d), (0, 2, 1, 3))  # 0.26's NHD
K_BEFORE_V = _Backend("KV_FIRST", lambda b, n, h, d: (2, b, n, h, d), (0, 1, 2, 3, 4))


def _group(backend):
    spec = types.SimpleNamespace(block_size=16, num_kv_heads=2, head_size=64)
    return types.SimpleNamespace(kv_cache_spec=spec, backend=backend)


def test_only_backends_that_keep_a_block_contiguous_are_paged():
    assert vllm_worker.blocks_not_outermost([_group(FLASH_ATTN)], "auto") is None
    reason = vllm_worker.blocks_not_outermost([_group(FLASH_ATTN), _group(K_BEFORE_V)], "auto")
    assert reason is not None and "KV_FIRST" in reason


def _attn_utils_double():
    """TEST DOUBLE of vllm 0.26's vllm.v1.worker.gpu.attn_utils: init_kv_cache calls the module's
    _allocate_kv_cache(kv_cache_config, shared_layers, device) by name, then builds views over what it returns."""
    module = types.ModuleType("attn_utils_026_double")

    def _allocate_kv_cache(kv_cache_config, shared_layers, device):
        return {name: torch.zeros(t.size, dtype=torch.int8, device=device)
                for t in kv_cache_config.kv_cache_tensors for name in t.shared_by}

    def init_kv_cache(runner_kv_caches, forward_context, kv_cache_config, attn_groups, device, cache_dtype,
                      kernel_block_sizes, vllm_config):
        raw = module._allocate_kv_cache(kv_cache_config, {}, device)
        return {name: t.view(torch.bfloat16) for name, t in raw.items()}

    module._allocate_kv_cache = _allocate_kv_cache
    module.init_kv_cache = init_kv_cache
    return module


def test_init_kv_cache_builds_vllms_views_over_the_region_and_puts_the_allocator_back(shm_dir, opened_regions):
    attn_utils = _attn_utils_double()
    allocate = attn_utils._allocate_kv_cache
    elastic = vllm_worker.elastic_init_kv_cache(attn_utils.init_kv_cache, attn_utils)
    kv_caches = elastic([], {}, _unpacked(num_blocks=37), [[_group(FLASH_ATTN)]], torch.device("cpu"), "auto",
                        [16], None)
    region = vllm_worker._regions[-1]
    assert attn_utils._allocate_kv_cache is allocate
    assert all(region.address <= t.data_ptr() < region.address + region.size for t in kv_caches.values())


def test_a_backend_that_splits_blocks_keeps_vllms_own_static_cache(shm_dir, opened_regions):
    attn_utils = _attn_utils_double()
    count = len(vllm_worker._regions)
    elastic = vllm_worker.elastic_init_kv_cache(attn_utils.init_kv_cache, attn_utils)
    kv_caches = elastic([], {}, _unpacked(num_blocks=8), [[_group(K_BEFORE_V)]], torch.device("cpu"), "auto",
                        [16], None)
    assert len(vllm_worker._regions) == count, "no region: vLLM allocated its own tensors"
    assert set(kv_caches) == set(_names(4))


def test_the_warm_up_maps_every_page_and_stops_cleanly_where_memory_ends():
    """map_for_warmup on a real host region; the refusal half with a TEST DOUBLE region whose map raises
    MemoryError past a page count (a full device cannot be made here)."""
    from kvcached import _core

    with _core.Region(10 * PAGE, PAGE) as region:
        assert vllm_worker.map_for_warmup(region) == 10 and region.num_mapped == 10

    class FullAfter:  # TEST DOUBLE: a device that backs `room` pages
        num_pages, room, mapped = 1000, 600, 0

        def map(self, pages):
            if self.mapped + len(pages) > self.room:
                raise MemoryError("out of device memory")
            self.mapped += len(pages)

    region = FullAfter()
    assert vllm_worker.map_for_warmup(region) == 512  # two whole chunks of 256; the third did not fit

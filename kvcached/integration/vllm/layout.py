"""Translate vLLM's KV cache placement into a kvcached layout, identically in the scheduler and the worker.

vLLM 0.32 places every layer in one backing allocation: layer l of block b starts at
`offset + l * layer_stride + b * block_stride` (KVCacheTensor). kvcached commits memory in pages, so it needs every
block to start at the same page offset in every layer. For layer-outermost layouts (LBHNC, the only one vLLM-CPU's
attention accepts) we pad `layer_stride` up to a page multiple: the padding is virtual address space only, never
backed, and it makes a *logical page* (page g of every layer) hold whole blocks. Block-outermost layouts already
keep a block's layers together and need no padding.

Both processes call `plan_pool()` on the same KVCacheConfig, so they derive the same layout without talking.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kvcached.layout import KVLayout


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class PoolPlan:
    layout: KVLayout  # block -> pages, for the scheduler's allocator
    buffer_size: int  # bytes of the region backing the whole pool (padded)
    kv_cache_tensors: list[Any]  # KVCacheTensors with the padded strides, for the worker's views


class UnsupportedLayout(ValueError):
    """The KV cache shape is one kvcached cannot page; the engine keeps its static pool."""


def plan_pool(kv_cache_config: Any, layout: Any, page_size: int) -> PoolPlan:
    tensors = list(kv_cache_config.kv_cache_tensors)
    if len(tensors) != 1:
        raise UnsupportedLayout(
            f"{len(tensors)} KV cache tensors (hybrid or multi-spec model); kvcached pages single-spec models only")
    tensor = tensors[0]
    if tensor.offset != 0 or getattr(tensor, "host_resident", False):
        raise UnsupportedLayout("KV cache tensor with an offset or host-resident blocks")
    if not layout.is_block_compact:
        raise UnsupportedLayout(
            f"layout {layout.name} scatters a block across heads; use a block-compact layout such as LBHNC")
    num_blocks = kv_cache_config.num_blocks
    num_layers = len(tensor.layers)
    if layout.is_block_outermost:
        # A block is one contiguous run of all its layers: page the buffer as a single layer.
        kv_layout = KVLayout(num_blocks=num_blocks, block_bytes=tensor.block_stride, num_layers=1,
                             page_size=page_size,
                             layer_stride=_round_up(num_blocks * tensor.block_stride, page_size))
        padded = dataclasses.replace(tensor, size=kv_layout.region_size)
    else:
        layer_stride = _round_up(tensor.layer_stride, page_size)
        kv_layout = KVLayout(num_blocks=num_blocks, block_bytes=tensor.block_stride, num_layers=num_layers,
                             page_size=page_size, layer_stride=layer_stride)
        padded = dataclasses.replace(tensor, size=kv_layout.region_size, layer_stride=layer_stride)
    return PoolPlan(layout=kv_layout, buffer_size=kv_layout.region_size, kv_cache_tensors=[padded])

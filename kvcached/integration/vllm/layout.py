"""Translate vLLM's KV cache placement into a kvcached layout, identically in the scheduler and the worker.

Two generations of vLLM place the KV cache differently; `plan_pool` takes either.

vLLM 0.25 and 0.26 (`KVCacheTensor(size, shared_by, offset, block_stride)`) allocate one tensor per KV cache tensor,
each shared by the layers it names, every block a contiguous page of `size // num_blocks` bytes (the attention
backends kvcached accepts there keep blocks outermost). kvcached reserves one region for all of them, each tensor's
slice starting on a page boundary, so a logical page (page g of every slice) again holds whole blocks. A packed
config (`block_stride > 0`) makes every tensor a view of one backing allocation in which a block holds all layers:
block-outermost, no padding.

vLLM 0.30 and later place every layer in one backing allocation: layer l of block b starts at
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
    # vLLM 0.25/0.26: where each KVCacheTensor's own tensor starts in the region, in the config's order (its size
    # is the tensor's `size`); empty for one backing allocation.
    tensor_offsets: tuple[int, ...] = ()


class UnsupportedLayout(ValueError):
    """The KV cache shape is one kvcached cannot page; the engine keeps its static pool."""


def plan_pool(kv_cache_config: Any, layout: Any, page_size: int) -> PoolPlan:
    """The region and its layout for `kv_cache_config`; `layout` is vLLM's resolved KVCacheLayout (0.30 and later;
    None before, where each tensor's own shape is the backend's)."""
    tensors = list(kv_cache_config.kv_cache_tensors)
    if tensors and hasattr(tensors[0], "shared_by"):
        return _plan_tensor_per_layer(kv_cache_config.num_blocks, tensors, page_size)
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


def _plan_tensor_per_layer(num_blocks: int, tensors: list[Any], page_size: int) -> PoolPlan:
    """vLLM 0.25/0.26: one tensor per KVCacheTensor (unpacked), or one packed backing every tensor views."""
    sizes = {t.size for t in tensors}
    packed = [t.block_stride > 0 for t in tensors]
    if any(packed):
        strides = {t.block_stride for t in tensors}
        if not all(packed) or len(sizes) != 1 or len(strides) != 1:
            raise UnsupportedLayout("a packed KV cache mixed with unpacked tensors, or packed tensors of several "
                                    "sizes; kvcached pages one packed backing only")
        size, block_stride = sizes.pop(), strides.pop()
        if size < num_blocks * block_stride:
            raise UnsupportedLayout(f"a packed KV backing of {size} B cannot hold {num_blocks} blocks of "
                                    f"{block_stride} B")
        kv_layout = KVLayout(num_blocks=num_blocks, block_bytes=block_stride, num_layers=1, page_size=page_size,
                             layer_stride=_round_up(size, page_size))
        return PoolPlan(layout=kv_layout, buffer_size=kv_layout.region_size, kv_cache_tensors=tensors,
                        tensor_offsets=(0,) * len(tensors))
    if len(sizes) != 1:
        raise UnsupportedLayout(f"KV cache tensors of {len(sizes)} sizes (layers of different shapes); kvcached "
                                "pages models whose layers all have one KV shape")
    size = sizes.pop()
    if any(t.offset for t in tensors) or size % num_blocks:
        raise UnsupportedLayout(f"KV cache tensors of {size} B are not {num_blocks} whole blocks")
    stride = _round_up(size, page_size)
    kv_layout = KVLayout(num_blocks=num_blocks, block_bytes=size // num_blocks, num_layers=len(tensors),
                         page_size=page_size, layer_stride=stride)
    return PoolPlan(layout=kv_layout, buffer_size=kv_layout.region_size, kv_cache_tensors=tensors,
                    tensor_offsets=tuple(i * stride for i in range(len(tensors))))

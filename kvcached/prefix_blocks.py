"""Whole KV blocks between an engine's per-layer cache tensors and a prefix store: the connector's data path.

Engine-agnostic (torch, no vLLM), so the GPU tier tests it on a device without an engine. A block of one layer is
`select(block_dim, block_id)` of that layer's tensor; a chunk in the store holds that block for every layer.

Host tensors in one piece are read and written in place (the store's preadv lands straight in the cache). Device
tensors go through pinned host staging buffers, allocated once per layer and reused: the host<->device copies of a
block's layers are queued on the current stream and waited for once per block, not once per layer.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


class BlockCopier:
    def __init__(self, kv_caches: Sequence[torch.Tensor], block_dim: int, part_bytes: int) -> None:
        self.kv_caches = list(kv_caches)
        self.block_dim = block_dim
        self.part_bytes = part_bytes
        self._staging: list[torch.Tensor] | None = None

    def views(self, block_id: int) -> list[torch.Tensor]:
        return [kv.select(self.block_dim, block_id) for kv in self.kv_caches]

    @staticmethod
    def _direct(view: torch.Tensor) -> memoryview | None:
        """The block's own memory as a writable byte buffer, when it is host memory in one piece."""
        if view.device.type != "cpu" or not view.is_contiguous():
            return None
        return memoryview(view.view(-1).view(torch.uint8).numpy())

    def _staging_buffers(self) -> list[torch.Tensor]:
        if self._staging is None:
            pin = torch.cuda.is_available() and any(kv.device.type == "cuda" for kv in self.kv_caches)
            self._staging = [torch.empty(self.part_bytes, dtype=torch.uint8, pin_memory=pin)
                             for _ in self.kv_caches]
        return self._staging

    @staticmethod
    def _wait(views: Sequence[torch.Tensor]) -> None:
        if any(v.device.type == "cuda" for v in views):
            torch.cuda.current_stream(views[0].device).synchronize()

    def load(self, store: Any, key: str, block_id: int) -> bool:
        """Chunk `key` into block `block_id` of every layer; False (the block holds garbage) when the store cannot
        give it back."""
        views = self.views(block_id)
        direct = [self._direct(v) for v in views]
        if all(d is not None for d in direct):
            return bool(store.load_into(key, direct))
        staging = self._staging_buffers()
        self._wait(views)  # the previous block's copies out of the staging buffers are done
        if not store.load_into(key, [memoryview(s.numpy()) for s in staging]):
            return False
        for view, host in zip(views, staging):
            view.copy_(host.view(view.dtype).view(view.shape), non_blocking=True)
        self._wait(views)  # the staging buffers are reused by the next block
        return True

    def save(self, store: Any, key: str, block_id: int) -> bool:
        """Block `block_id` of every layer into the store as chunk `key`; False when the store declines it."""
        views = self.views(block_id)
        buffers = [self._direct(v) for v in views]
        if all(b is not None for b in buffers):
            return bool(store.save_from(key, buffers))
        staging = self._staging_buffers()
        for view, host in zip(views, staging):
            host.view(view.dtype).view(view.shape).copy_(view, non_blocking=True)
        self._wait(views)
        return bool(store.save_from(key, [memoryview(s.numpy()) for s in staging]))

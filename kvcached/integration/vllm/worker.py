"""Worker side: back vLLM's KV buffer with a kvcached region, and keep this process's view of it current.

`allocate_kv_cache` (vllm/v1/worker/utils.py) makes the whole pool with one `torch.zeros(buf_size, int8)` and then
takes per-layer views. We let vLLM do everything as usual except that one allocation, which becomes a DLPack view
of a kvcached region: virtual address space for the whole pool, no physical memory until the scheduler commits
pages. The scheduler lives in another process; it commits pages in the region's shared state, and the worker calls
`Region.sync()` before every step so its view maps exactly the committed pages (one atomic read when nothing
changed). On CUDA a background thread also syncs while the engine is idle, so pages freed after a burst go back to
the driver without waiting for the next request.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from typing import Any

from kvcached.integration.vllm import engine_env
from kvcached.integration.vllm.layout import UnsupportedLayout, plan_pool
from kvcached.shm import ensure_dir

logger = logging.getLogger("kvcached")

IDLE_SYNC_INTERVAL_S = 0.1
# The CUDA handle pool of a region whose pages a scheduler in ANOTHER process decides: it would hold device memory
# no budget sees, so it stays off; a scheduler in this process adopts the region and turns it on (it counts it).
POOL_OFF = 0
POOL_ON = 64
_regions: list[Any] = []  # regions of this worker process; they live as long as the engine does
# Held for a whole model step, and by the idle-sync thread while it changes the view: the thread never unmaps a
# page while a step runs. (With async scheduling the GPU may still run a step after execute_model returned; the
# CUDA backend synchronizes the device before any unmap, so those kernels finish first.)
_step_lock = threading.Lock()


class _TorchWithPoolZeros:
    """The `torch` module, except that `zeros` of exactly the pool's size returns the region-backed tensor."""

    def __init__(self, torch_module: Any, size: int, tensor: Any):
        self._torch = torch_module
        self._size = size
        self._tensor = tensor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def zeros(self, *size: Any, **kwargs: Any) -> Any:
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        if tuple(shape) == (self._size,) and kwargs.get("dtype") == self._torch.int8:
            # Fresh pages read as zeros, as torch.zeros would have given.
            return self._tensor
        return self._torch.zeros(*size, **kwargs)


def _tensor_parallel_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # not initialised (single process): rank 0
        return 0


def elastic_allocate_kv_cache(original, utils_module):
    """Wrap vLLM's allocate_kv_cache(kv_cache_config, device, layout, kernel_block_sizes=None)."""

    @functools.wraps(original)
    def allocate_kv_cache(kv_cache_config, device, layout, *args, **kwargs):
        import torch

        from kvcached import _core

        settings = engine_env.engine_settings(torch.device(device).type)
        try:
            plan = plan_pool(kv_cache_config, layout, settings.page_size)
            if settings.backend == "host" and _tensor_parallel_rank() != 0:
                raise UnsupportedLayout("tensor parallelism on the host backend")
        except UnsupportedLayout as exc:
            logger.warning("kvcached: %s; this engine keeps a static KV cache", exc)
            return original(kv_cache_config, device, layout, *args, **kwargs)

        device_index = torch.device(device).index or 0
        path = settings.pool_path()
        ensure_dir(path.parent)
        region = _core.Region(plan.buffer_size, settings.page_size, backend=settings.backend,
                              device=device_index, path=str(path))
        if settings.backend == "cuda":
            region.set_pool_limit(POOL_OFF)
        buffer = torch.from_dlpack(region)
        _regions.append(region)
        padded = dataclasses.replace(kv_cache_config, kv_cache_tensors=plan.kv_cache_tensors)
        real_torch = utils_module.torch
        utils_module.torch = _TorchWithPoolZeros(real_torch, plan.buffer_size, buffer)
        try:
            kv_caches = original(padded, device, layout, *args, **kwargs)
        finally:
            utils_module.torch = real_torch
        logger.info("kvcached: KV pool of %.1f MiB virtual (%d blocks) backed by %s region %s",
                    plan.buffer_size / 2**20, kv_cache_config.num_blocks, settings.backend, path)
        if settings.backend == "cuda":
            _start_idle_sync()
        return kv_caches

    return allocate_kv_cache


def capped_available_memory(original):
    """Wrap Worker.determine_available_memory: the pool vLLM sizes is bounded by the group's budget, when capped.

    The number of blocks is then fixed at start-up by configuration (pool size, group cap) and never by how much
    memory happens to be free at that moment; physical memory is checked block by block at run time instead.
    """

    @functools.wraps(original)
    def determine_available_memory(self, *args, **kwargs):
        available = original(self, *args, **kwargs)
        from kvcached.budget import group_cap

        cap = group_cap(engine_env.engine_settings("cpu").group)
        if cap is not None and 0 < cap < available:
            logger.info("kvcached: KV pool bounded by the group cap: %.1f MiB instead of %.1f MiB",
                        cap / 2**20, available / 2**20)
            return cap
        return available

    return determine_available_memory


def region_at(path: Any) -> Any:
    """The region this process made for `path`, if any: a scheduler in this process maps through it directly."""
    for region in _regions:
        if region.path == str(path):
            return region
    return None


def sync_regions() -> None:
    for region in _regions:
        region.sync()


def syncing_execute_model(original):
    """Wrap GPUModelRunner.execute_model (CPUModelRunner inherits it): make the view current, then run the step."""

    @functools.wraps(original)
    def execute_model(self, *args, **kwargs):
        if not _regions:
            return original(self, *args, **kwargs)
        with _step_lock:
            sync_regions()
            return original(self, *args, **kwargs)

    return execute_model


_idle_sync_started = False


def idle_sync_loop(stop: threading.Event, interval_s: float = IDLE_SYNC_INTERVAL_S) -> None:
    """Apply the scheduler's unmaps while the engine is idle, so pages freed after a burst go back to the driver
    without waiting for the next request; only between steps (a step holds `_step_lock`, and syncs first itself)."""
    while not stop.wait(interval_s):
        try:
            if _step_lock.acquire(timeout=interval_s):
                try:
                    sync_regions()
                finally:
                    _step_lock.release()
        except Exception:  # a failing sync must not kill the engine; the next step syncs again
            logger.exception("kvcached: background sync failed")


def _start_idle_sync() -> None:
    global _idle_sync_started
    if _idle_sync_started:
        return
    _idle_sync_started = True
    threading.Thread(target=idle_sync_loop, args=(threading.Event(),), name="kvcached-idle-sync",
                     daemon=True).start()

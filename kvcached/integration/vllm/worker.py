"""Worker side: back vLLM's KV buffer with a kvcached region, and keep this process's view of it current.

`allocate_kv_cache` (vllm/v1/worker/utils.py) makes the whole pool with one `torch.zeros(buf_size, int8)` and then
takes per-layer views. We let vLLM do everything as usual except that one allocation, which becomes a DLPack view
of a kvcached region: virtual address space for the whole pool, no physical memory until the scheduler commits
pages. The scheduler lives in another process; it commits pages in the region's shared state, and the worker calls
`Region.sync()` before every step so its view maps exactly the committed pages (one atomic read when nothing
changed). On CUDA a background thread also syncs while the engine is idle, so pages freed after a burst go back to
the driver without waiting for the next request.

vLLM 0.25/0.26 allocate one tensor per KV cache tensor instead (`_allocate_kv_cache` in the V2 model runner,
`GPUModelRunner._allocate_kv_cache_tensors` in V1): there every tensor becomes a page-aligned slice of one region.

On CUDA the worker maps the whole pool while vLLM warms up. vLLM's warm-up and CUDA-graph capture run real steps on
made-up requests whose blocks (ids 1, 2, ...) no scheduler handed out, and a CUDA page that is not mapped faults
(there is no zero page behind it). The scheduler, which starts after the warm-up, gives every page back before it
hands out its first block; until then the engine holds what a static one holds for its whole life.
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


def _plan(kv_cache_config: Any, layout: Any, device: Any) -> tuple[Any, Any] | None:
    """(settings, plan) for this engine's pool, or None (logged) when kvcached cannot page it."""
    import torch

    settings = engine_env.engine_settings(torch.device(device).type)
    try:
        plan = plan_pool(kv_cache_config, layout, settings.page_size)
        if settings.backend == "host" and _tensor_parallel_rank() != 0:
            raise UnsupportedLayout("tensor parallelism on the host backend")
    except UnsupportedLayout as exc:
        logger.warning("kvcached: %s; this engine keeps a static KV cache", exc)
        return None
    return settings, plan


def _open_region(settings: Any, plan: Any, device: Any) -> Any:
    """The engine's region (every page mapped for the warm-up on CUDA) and a torch int8 view of all of it."""
    import torch

    from kvcached import _core

    path = settings.pool_path()
    ensure_dir(path.parent)
    region = _core.Region(plan.buffer_size, settings.page_size, backend=settings.backend,
                          device=torch.device(device).index or 0, path=str(path))
    if settings.backend == "cuda":
        region.set_pool_limit(POOL_OFF)
        map_for_warmup(region)
    _regions.append(region)
    logger.info("kvcached: KV pool of %.1f MiB virtual (%d blocks) backed by %s region %s",
                plan.buffer_size / 2**20, plan.layout.num_blocks, settings.backend, path)
    return torch.from_dlpack(region)


WARMUP_MAP_CHUNK = 256  # pages per map call while backing the warm-up: a refusal keeps what was mapped before it


def map_for_warmup(region: Any) -> int:
    """Map every page of a new CUDA region, in chunks, lowest pages first (the warm-up's made-up requests take
    blocks from id 1 upwards). When the device cannot back all of it (pools larger than the memory, as engines
    that share one budget may ask for), the warm-up keeps the low pages it got and a warning says how many.
    Returns the pages mapped; the scheduler unmaps them all before its first block (patches.attach_elastic_pool)."""
    mapped = 0
    for first in range(0, region.num_pages, WARMUP_MAP_CHUNK):
        pages = list(range(first, min(first + WARMUP_MAP_CHUNK, region.num_pages)))
        try:
            region.map(pages)
        except MemoryError:
            logger.warning("kvcached: the device backs only %d of %d pages for vLLM's warm-up; a warm-up request "
                           "past them would fault", mapped, region.num_pages)
            break
        mapped += len(pages)
    return mapped


def elastic_allocate_kv_cache(original, utils_module):
    """Wrap vLLM's allocate_kv_cache(kv_cache_config, device, layout, kernel_block_sizes=None) (0.30 and later)."""

    @functools.wraps(original)
    def allocate_kv_cache(kv_cache_config, device, layout, *args, **kwargs):
        if kwargs.get("allocate") is not None:  # vLLM 0.34+: its extensible KV cache owns the allocation
            logger.warning("kvcached: vLLM's extensible KV cache backs this pool (--enable-extensible-kv-cache); "
                           "this engine keeps it and kvcached does not page it")
            return original(kv_cache_config, device, layout, *args, **kwargs)
        planned = _plan(kv_cache_config, layout, device)
        if planned is None:
            return original(kv_cache_config, device, layout, *args, **kwargs)
        settings, plan = planned
        buffer = _open_region(settings, plan, device)
        padded = dataclasses.replace(kv_cache_config, kv_cache_tensors=plan.kv_cache_tensors)
        real_torch = utils_module.torch
        utils_module.torch = _TorchWithPoolZeros(real_torch, plan.buffer_size, buffer)
        try:
            kv_caches = original(padded, device, layout, *args, **kwargs)
        finally:
            utils_module.torch = real_torch
        if settings.backend == "cuda":
            _start_idle_sync()
        return kv_caches

    return allocate_kv_cache


def region_backed_kv_tensors(kv_cache_config: Any, device: Any) -> dict[str, Any] | None:
    """vLLM 0.25/0.26: what `_allocate_kv_cache` returns (layer name -> its raw int8 tensor), every tensor a
    page-aligned slice of one kvcached region; None (logged) when kvcached cannot page this config."""
    planned = _plan(kv_cache_config, None, device)
    if planned is None:
        return None
    settings, plan = planned
    buffer = _open_region(settings, plan, device)
    raw: dict[str, Any] = {}
    for tensor, offset in zip(plan.kv_cache_tensors, plan.tensor_offsets):
        view = buffer[offset:offset + tensor.size]
        for layer_name in tensor.shared_by:
            raw[layer_name] = view
    if settings.backend == "cuda":
        _start_idle_sync()
    return raw


def blocks_not_outermost(groups: Any, cache_dtype: str) -> str | None:
    """Why an attention backend of these groups does not keep each KV block contiguous (vLLM 0.25/0.26 lay every
    layer out as its backend says), or None when all do. A backend that puts K before V for all blocks (the block
    dimension second in memory) splits a block in two places, which one page cannot hold."""
    probe = 1234567  # a block count no other dimension has, as vLLM's own get_kv_cache_block_dim does
    for group in groups:
        spec, backend = group.kv_cache_spec, group.backend
        if not hasattr(spec, "num_kv_heads") or not hasattr(backend, "get_kv_cache_shape"):
            continue
        shape = tuple(backend.get_kv_cache_shape(probe, spec.block_size, spec.num_kv_heads, spec.head_size,
                                                 cache_dtype_str=cache_dtype))
        try:
            order = tuple(backend.get_kv_cache_stride_order())
        except (AttributeError, NotImplementedError):
            order = tuple(range(len(shape)))
        if len(order) != len(shape):
            order = tuple(range(len(shape)))
        if probe not in shape or order[0] != shape.index(probe):
            return f"attention backend {getattr(backend, '__name__', backend)} does not keep each KV block contiguous"
    return None


def elastic_init_kv_cache(original, attn_utils):
    """Wrap vLLM 0.25/0.26's V2 init_kv_cache(runner_kv_caches, forward_context, kv_cache_config, attn_groups,
    device, cache_dtype, ...): its raw tensors come from one kvcached region; the views are vLLM's own."""
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def init_kv_cache(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        reason = blocks_not_outermost([g for gs in bound["attn_groups"] for g in gs], bound["cache_dtype"])
        if reason is not None:
            logger.warning("kvcached: %s; this engine keeps a static KV cache", reason)
            return original(*args, **kwargs)
        raw = region_backed_kv_tensors(bound["kv_cache_config"], bound["device"])
        if raw is None:
            return original(*args, **kwargs)
        allocate = attn_utils._allocate_kv_cache
        attn_utils._allocate_kv_cache = lambda kv_cache_config, shared_layers, device: dict(raw)
        try:
            return original(*args, **kwargs)
        finally:
            attn_utils._allocate_kv_cache = allocate

    return init_kv_cache


def elastic_allocate_kv_cache_tensors(original):
    """Wrap vLLM 0.25/0.26's V1 GPUModelRunner._allocate_kv_cache_tensors(self, kv_cache_config)."""

    @functools.wraps(original)
    def _allocate_kv_cache_tensors(self, kv_cache_config):
        groups = [g for gs in getattr(self, "attn_groups", ()) for g in gs]
        reason = blocks_not_outermost(groups, self.cache_config.cache_dtype)
        if reason is not None:
            logger.warning("kvcached: %s; this engine keeps a static KV cache", reason)
            return original(self, kv_cache_config)
        raw = region_backed_kv_tensors(kv_cache_config, self.device)
        return original(self, kv_cache_config) if raw is None else raw

    return _allocate_kv_cache_tensors


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

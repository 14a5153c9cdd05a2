"""The patches, and the list of vLLM hook targets they rely on (tests check each against vLLM's real classes).

Each patch is applied when vLLM itself imports the module that holds its target (import_hooks.when_imported), so
the API server process, which runs neither a scheduler nor a worker, pays nothing.
Worker side (worker.py): the KV buffer becomes a kvcached region; every step syncs the view first.
Scheduler side (block_pool.py): BlockPool hands out blocks on mapped pages and maps pages on demand.
"""
from __future__ import annotations

import atexit
import functools
import importlib
import inspect
import logging
import time
from types import ModuleType
from typing import Any

from kvcached.integration.import_hooks import when_imported
from kvcached.integration.vllm import engine_env, worker
from kvcached.integration.vllm.layout import UnsupportedLayout, plan_pool

logger = logging.getLogger("kvcached")

# (module, attribute path, parameter names the patch relies on). A vLLM upgrade that moves or reshapes one of these
# fails tests/unit/test_vllm_integration.py (the installed release) or tests/unit/test_vllm_versions.py (every other
# release in versions.py) instead of silently running a static cache.
# Where the worker allocates the KV cache, in two generations of vLLM (versions.VersionRow.kv_allocation):
BACKING_TARGETS: list[tuple[str, str, tuple[str, ...]]] = [  # 0.30 and later: one backing allocation
    ("vllm.v1.worker.utils", "allocate_kv_cache", ("kv_cache_config", "device", "layout")),
    ("vllm.v1.worker.gpu_model_runner", "allocate_kv_cache", ("kv_cache_config", "device", "layout")),
]
PER_LAYER_TARGETS: list[tuple[str, str, tuple[str, ...]]] = [  # 0.25, 0.26: a tensor per KV cache tensor
    ("vllm.v1.worker.gpu.attn_utils", "init_kv_cache",
     ("runner_kv_caches", "forward_context", "kv_cache_config", "attn_groups", "device", "cache_dtype")),
    ("vllm.v1.worker.gpu.attn_utils", "_allocate_kv_cache", ("kv_cache_config", "shared_layers", "device")),
    ("vllm.v1.worker.gpu.model_runner", "init_kv_cache", ()),  # imported by name: patched there too
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._allocate_kv_cache_tensors", ("self", "kv_cache_config")),
]
# Everything else, the same in every release of the table.
COMMON_TARGETS: list[tuple[str, str, tuple[str, ...]]] = [
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model", ("self", "scheduler_output")),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.execute_model", ("self", "scheduler_output")),  # V2 runner
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.execute_model", ("self", "scheduler_output")),
    ("vllm.v1.worker.gpu_worker", "Worker.determine_available_memory", ("self",)),
    ("vllm.v1.worker.cpu_worker", "CPUWorker.determine_available_memory", ("self",)),
    ("vllm.v1.core.block_pool", "BlockPool.get_new_blocks", ("self", "num_blocks")),
    ("vllm.v1.core.block_pool", "BlockPool.free_blocks", ("self", "ordered_blocks")),
    ("vllm.v1.core.block_pool", "BlockPool.touch", ("self", "blocks")),
    ("vllm.v1.core.block_pool", "BlockPool.get_num_free_blocks", ("self",)),
    ("vllm.v1.core.block_pool", "BlockPool._maybe_evict_cached_block", ("self", "block")),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots",
     ("self", "request", "num_new_tokens", "num_new_computed_tokens", "new_computed_blocks")),
    ("vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator.get_num_blocks_to_allocate", ("self",)),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager", ()),  # by name, in allocate_slots
    ("vllm.v1.core.sched.scheduler", "Scheduler.__init__", ("self", "vllm_config", "kv_cache_config")),
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule", ("self",)),
    ("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output", ("self",)),
    ("vllm.v1.core.sched.scheduler", "Scheduler.finish_requests", ("self",)),
    ("vllm.v1.core.sched.scheduler", "Scheduler.reset_prefix_cache", ("self",)),
    ("vllm.v1.core.sched.scheduler", "Scheduler.shutdown", ("self",)),
]
# The prefix connector's overrides of vLLM's KV connector API (kvcached/integration/vllm/prefix_connector.py): vLLM
# calls them with these leading parameters.
CONNECTOR_TARGETS: list[tuple[str, str, tuple[str, ...]]] = [
    ("vllm.distributed.kv_transfer.kv_connector.v1.base", f"KVConnectorBase_V1.{method}", params)
    for method, params in (
        ("__init__", ("self", "vllm_config", "role", "kv_cache_config")),
        ("get_num_new_matched_tokens", ("self", "request", "num_computed_tokens")),
        ("update_state_after_alloc", ("self", "request", "blocks", "num_external_tokens")),
        ("build_connector_meta", ("self", "scheduler_output")),
        ("request_finished", ("self", "request", "block_ids")),
        ("register_kv_caches", ("self", "kv_caches")),
        ("start_load_kv", ("self", "forward_context")),
        ("wait_for_layer_load", ("self", "layer_name")),
        ("save_kv_layer", ("self", "layer_name", "kv_layer", "attn_metadata")),
        ("wait_for_save", ("self",)),
        ("get_block_ids_with_load_errors", ("self",)),
    )
]
ALLOCATION_TARGETS = {"backing": BACKING_TARGETS, "per_layer": PER_LAYER_TARGETS}
# Names kvcached reads or calls besides the targets above (attributes a class sets, dataclass fields, properties,
# methods), as (module, "Class.name"): a release that renames one would break kvcached as surely as a moved target.
RELIED_ON: list[tuple[str, str]] = [
    ("vllm.v1.core.block_pool", f"BlockPool.{name}")
    for name in ("blocks", "free_block_queue", "null_block", "enable_caching")
] + [
    ("vllm.v1.core.kv_cache_utils", f"FreeKVCacheBlockQueue.{name}") for name in ("remove", "prepend_n")
] + [
    ("vllm.v1.core.kv_cache_utils", f"KVCacheBlock.{name}") for name in ("block_id", "ref_cnt", "block_hash", "is_null")
] + [
    ("vllm.v1.core.kv_cache_manager", f"KVCacheManager.{name}")
    for name in ("block_pool", "coordinator", "watermark_blocks")
] + [
    ("vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator.single_type_managers"),
    ("vllm.v1.kv_cache_interface", "KVCacheConfig.num_blocks"),
    ("vllm.v1.kv_cache_interface", "KVCacheConfig.kv_cache_tensors"),
] + [
    ("vllm.v1.core.sched.scheduler", f"Scheduler.{name}")
    for name in ("vllm_config", "kv_cache_config", "kv_cache_manager", "block_size")
]
ALLOCATION_RELIED_ON: dict[str, list[tuple[str, str]]] = {
    "backing": [("vllm.v1.kv_cache_interface", f"KVCacheTensor.{name}")
                for name in ("size", "layers", "layer_stride", "block_stride", "offset")] + [
        ("vllm.config.cache", "CacheConfig.get_resolved_kv_cache_layout"),
        ("vllm.v1.kv_cache_layout", "KVCacheLayout.is_block_compact"),
        ("vllm.v1.kv_cache_layout", "KVCacheLayout.is_block_outermost")],
    "per_layer": [("vllm.v1.kv_cache_interface", f"KVCacheTensor.{name}")
                  for name in ("size", "shared_by", "offset", "block_stride")],
}


# The installed release's targets (the newest generation; tests/unit/test_vllm_integration.py checks them live).
HOOK_TARGETS = BACKING_TARGETS + COMMON_TARGETS + CONNECTOR_TARGETS


def hook_targets_for(kv_allocation: str) -> list[tuple[str, str, tuple[str, ...]]]:
    return ALLOCATION_TARGETS[kv_allocation] + COMMON_TARGETS + CONNECTOR_TARGETS


def relied_on_for(kv_allocation: str) -> list[tuple[str, str]]:
    return RELIED_ON + ALLOCATION_RELIED_ON[kv_allocation]


_WORKER_MODULES = ("vllm.v1.worker.utils", "vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.attn_utils")


def _ek(pool: Any):
    return getattr(pool, "_kvcached", None)


# Worker ----------------------------------------------------------------------------------------------------
def _wrapped_wherever_imported(owner: str, name: str, wrap: Any):
    """A hook for modules that use `owner.name`: the first time, `owner.name` becomes `wrap(original, owner_module)`;
    every module that imported the original by name (`from owner import name`) gets the wrapped one too."""
    kept = f"_kvcached_original_{name}"

    def patch(module: ModuleType) -> None:
        owner_module = importlib.import_module(owner)
        original = owner_module.__dict__.get(kept)
        if original is None:
            original = getattr(owner_module, name)
            setattr(owner_module, kept, original)
            setattr(owner_module, name, wrap(original, owner_module))
        if getattr(module, name, None) is original:
            setattr(module, name, getattr(owner_module, name))

    return patch


# vLLM 0.30+: allocate_kv_cache, also where the model runners imported it by name.
_patch_allocate = _wrapped_wherever_imported("vllm.v1.worker.utils", "allocate_kv_cache",
                                             worker.elastic_allocate_kv_cache)
# vLLM 0.25/0.26, V2 model runner: attn_utils.init_kv_cache, also where model_runner imported it by name.
_patch_per_layer_allocation = _wrapped_wherever_imported("vllm.v1.worker.gpu.attn_utils", "init_kv_cache",
                                                         worker.elastic_init_kv_cache)


def _patch_worker_class(class_name: str):
    def patch(module: ModuleType) -> None:
        cls = getattr(module, class_name)
        if "determine_available_memory" in cls.__dict__ and _first_time(cls):
            cls.determine_available_memory = worker.capped_available_memory(cls.determine_available_memory)

    return patch


def _patch_model_runner(module: ModuleType) -> None:
    cls = module.GPUModelRunner
    if not _first_time(cls):
        return
    cls.execute_model = worker.syncing_execute_model(cls.execute_model)


def _patch_v1_runner_per_layer(module: ModuleType) -> None:
    """vLLM 0.25/0.26, V1 model runner: GPUModelRunner._allocate_kv_cache_tensors."""
    cls = module.GPUModelRunner
    if "_kvcached_per_layer" in cls.__dict__:
        return
    cls._kvcached_per_layer = True
    cls._allocate_kv_cache_tensors = worker.elastic_allocate_kv_cache_tensors(cls._allocate_kv_cache_tensors)


def _patch_extensible_kv_cache(module: ModuleType) -> None:
    """vLLM 0.34+ backs the KV cache with its own driver-mapped, grow-after-warm-up allocation by default on CUDA
    (`enable_extensible_kv_cache`). kvcached must own that allocation to page it, so the default becomes off; a user
    who asks for vLLM's (--enable-extensible-kv-cache) keeps it, and kvcached keeps its hands off the pool."""
    cls = module.VllmConfig
    resolve = cls.__dict__.get("_resolve_extensible_kv_cache")
    if resolve is None or cls.__dict__.get("_kvcached_extensible_off"):
        return
    cls._kvcached_extensible_off = True

    @functools.wraps(resolve)
    def resolve_with_kvcached(self, *args, **kwargs):
        cache_config = self.cache_config
        if (not getattr(cache_config, "_extensible_kv_cache_resolved", True)
                and getattr(cache_config, "enable_extensible_kv_cache", False) is None):
            cache_config.enable_extensible_kv_cache = False
            logger.info("kvcached: vLLM's extensible KV cache is off, as kvcached backs the KV cache "
                        "(--enable-extensible-kv-cache keeps vLLM's, and a static pool for kvcached)")
        return resolve(self, *args, **kwargs)

    cls._resolve_extensible_kv_cache = resolve_with_kvcached


# Scheduler -------------------------------------------------------------------------------------------------
def _first_time(cls: type) -> bool:
    """Patch each class once, however many times a module is seen (plugins load more than once)."""
    if cls.__dict__.get("_kvcached_patched"):
        return False
    cls._kvcached_patched = True
    return True


def _patch_block_pool(module: ModuleType) -> None:
    BlockPool = module.BlockPool
    if not _first_time(BlockPool):
        return
    get_new_blocks, free_blocks = BlockPool.get_new_blocks, BlockPool.free_blocks
    touch, get_num_free_blocks = BlockPool.touch, BlockPool.get_num_free_blocks

    @functools.wraps(get_new_blocks)
    def patched_get_new_blocks(self, num_blocks):
        ek = _ek(self)
        if ek is None:
            return get_new_blocks(self, num_blocks)
        start = time.perf_counter()
        chosen = [self.blocks[i] for i in ek.take(num_blocks)]
        queue = self.free_block_queue
        for block in chosen:
            queue.remove(block)
        queue.prepend_n(chosen)  # vLLM pops from the front: it now hands out exactly these, in this order
        ek.clock.hook(start)
        need, ek._need = ek._need, None  # vLLM's own free-count check must see its real count here
        try:
            return get_new_blocks(self, num_blocks)
        finally:
            ek._need = need

    @functools.wraps(free_blocks)
    def patched_free_blocks(self, ordered_blocks):
        ek = _ek(self)
        if ek is None:
            return free_blocks(self, ordered_blocks)
        blocks = list(ordered_blocks)
        free_blocks(self, blocks)
        start = time.perf_counter()
        ek.on_freed(blocks)
        ek.clock.hook(start)

    @functools.wraps(touch)
    def patched_touch(self, blocks):
        ek = _ek(self)
        if ek is not None:
            start = time.perf_counter()
            ek.on_touch(blocks)
            ek.clock.hook(start)
        return touch(self, blocks)

    @functools.wraps(get_num_free_blocks)
    def patched_get_num_free_blocks(self):
        count = get_num_free_blocks(self)
        ek = _ek(self)
        if ek is None:
            return count
        start = time.perf_counter()
        count = ek.free_block_count(count)  # inside allocate_slots: maps this request's blocks (see block_pool.py)
        ek.clock.hook(start)
        return count

    BlockPool.get_new_blocks = patched_get_new_blocks
    BlockPool.free_blocks = patched_free_blocks
    BlockPool.touch = patched_touch
    BlockPool.get_num_free_blocks = patched_get_num_free_blocks


def _patch_kv_cache_manager(module: ModuleType) -> None:
    cls = module.KVCacheManager
    if not _first_time(cls):
        return
    allocate_slots = cls.allocate_slots
    signature = inspect.signature(allocate_slots)
    # vLLM calls this for every running request at every step: read the two arguments without Signature.bind.
    new_computed_blocks = _argument(signature, "new_computed_blocks")
    reserved_blocks = _argument(signature, "reserved_blocks")

    @functools.wraps(allocate_slots)
    def patched_allocate_slots(self, *args, **kwargs):
        ek = _ek(self.block_pool)
        if ek is None:
            return allocate_slots(self, *args, **kwargs)
        start = time.perf_counter()
        hits = new_computed_blocks(args, kwargs)
        # vLLM counts every free prefix hit as a block to allocate only under full attention (a sliding window
        # skips some); elsewhere kvcached still spares the hits but does not subtract them.
        full = self.__dict__.get("_kvcached_full_attention")
        if full is None:  # fixed for the manager's life: decided once, not on every allocation
            full = all(type(m).__name__ == "FullAttentionManager" for m in self.coordinator.single_type_managers)
            self._kvcached_full_attention = full
        ek.begin_allocation(frozenset(b.block_id for group in (hits.blocks if hits is not None else ()) for b in group),
                            count_hits=full, reserved_blocks=int(reserved_blocks(args, kwargs) or 0))
        ek.clock.hook(start)
        admitted = False
        try:
            result = allocate_slots(self, *args, **kwargs)
            admitted = result is not None
            return result
        finally:
            start = time.perf_counter()
            ek.end_allocation(admitted)
            ek.clock.hook(start)

    cls.allocate_slots = patched_allocate_slots


def _argument(signature: inspect.Signature, name: str):
    """A reader of parameter `name` from a bound method's (args, kwargs), `self` not in args: by keyword, else by
    position, else its default (None when the release has no such parameter)."""
    params = list(signature.parameters.values())[1:]
    index = next((i for i, p in enumerate(params) if p.name == name), None)
    if index is None:
        return lambda args, kwargs: kwargs.get(name)
    default = None if params[index].default is inspect.Parameter.empty else params[index].default
    if params[index].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return lambda args, kwargs: kwargs.get(name, default)

    def read(args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        return args[index] if index < len(args) else default

    return read


def _patch_coordinator(module: ModuleType) -> None:
    cls = module.KVCacheCoordinator
    if not _first_time(cls):
        return
    original = cls.get_num_blocks_to_allocate

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        count = original(self, *args, **kwargs)
        ek = _ek(self.block_pool)
        if ek is not None:
            ek.note_need(count)
        return count

    cls.get_num_blocks_to_allocate = patched


def _locked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        ek = _ek(self.kv_cache_manager.block_pool) if hasattr(self, "kv_cache_manager") else None
        if ek is None:
            return method(self, *args, **kwargs)
        start = time.perf_counter()
        with ek.lock:
            clock = ek.clock
            if clock.depth:  # called from another wrapped entry point: already on the clock
                return method(self, *args, **kwargs)
            clock.lock_wait_s += time.perf_counter() - start
            clock.depth += 1
            try:
                return method(self, *args, **kwargs)
            finally:
                clock.depth -= 1
                clock.scheduler_s += time.perf_counter() - start
                clock.scheduler_calls += 1

    return wrapper


def _patch_scheduler(module: ModuleType) -> None:
    cls = module.Scheduler
    if not _first_time(cls):
        return
    init, shutdown = cls.__init__, cls.shutdown

    @functools.wraps(init)
    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        try:
            attach_elastic_pool(self)
        except UnsupportedLayout as exc:
            logger.warning("kvcached: %s; this engine keeps a static KV cache", exc)

    @functools.wraps(shutdown)
    def patched_shutdown(self, *args, **kwargs):
        try:
            return shutdown(self, *args, **kwargs)
        finally:
            ek = _ek(self.kv_cache_manager.block_pool)
            if ek is not None:
                ek.close()

    cls.__init__ = patched_init
    cls.shutdown = patched_shutdown
    for name in ("schedule", "update_from_output", "finish_requests", "reset_prefix_cache"):
        setattr(cls, name, _locked(getattr(cls, name)))


def attach_elastic_pool(scheduler: Any) -> None:
    """Give the scheduler's BlockPool a kvcached manager over the pool the worker created."""
    from kvcached import _core
    from kvcached.budget import BudgetRecord
    from kvcached.integration.vllm.block_pool import ElasticBlockPool
    from kvcached.kv_cache_manager import KVCacheManager

    vllm_config = scheduler.vllm_config
    device_type = vllm_config.device_config.device_type
    settings = engine_env.engine_settings(device_type)
    if settings.backend == "host" and vllm_config.parallel_config.tensor_parallel_size > 1:
        raise UnsupportedLayout("tensor parallelism on the host backend")
    # vLLM 0.30+ resolves one KV cache layout for the engine; before, each attention backend has its own.
    resolve_layout = getattr(vllm_config.cache_config, "get_resolved_kv_cache_layout", None)
    plan = plan_pool(scheduler.kv_cache_config, resolve_layout() if resolve_layout else None, settings.page_size)
    path = settings.pool_path()
    region = worker.region_at(path)
    owns_region = region is None
    if region is not None:
        # One process (vLLM on one GPU runs its worker inside the EngineCore): map through the worker's own region.
        # A device out of memory is then the allocator's refusal (the request waits), never a failed step, and the
        # region's handle pool is counted in the budget, so it may be on.
        if settings.backend == "cuda":
            region.set_pool_limit(worker.POOL_ON)
    else:
        if not path.exists():
            raise UnsupportedLayout(f"the worker made no kvcached pool at {path}")
        # The scheduler only decides which pages are committed; on CUDA the workers map them in their own context.
        backend = "host" if settings.backend == "host" else "state"
        region = _core.Region(plan.buffer_size, settings.page_size, backend=backend, path=str(path))
    # Every process that needs the file has it open now: unlink it, so a crash can never leak the pool.
    path.unlink(missing_ok=True)
    # The pages the worker mapped for vLLM's warm-up (CUDA) go back before the first block is handed out; on CUDA
    # workers in other processes apply this at their next sync.
    if region.num_mapped:
        logger.info("kvcached: giving back the %d pages mapped for vLLM's warm-up", region.num_mapped)
        region.unmap(list(range(region.num_pages)))
    record = BudgetRecord.create(plan.layout.num_logical_pages * plan.layout.logical_page_bytes,
                                 name=settings.engine_name, group=settings.group, exact=True,
                                 page_bytes=plan.layout.logical_page_bytes, pool_path=str(path),
                                 backend=settings.backend)
    manager = KVCacheManager(plan.layout, region, record)

    def close() -> None:
        record.close()
        if owns_region:
            region.close()

    pool = scheduler.kv_cache_manager.block_pool
    pool._kvcached = elastic = ElasticBlockPool(pool, manager,
                                                watermark_blocks=scheduler.kv_cache_manager.watermark_blocks,
                                                block_tokens=scheduler.block_size, on_close=close)
    # vLLM calls Scheduler.shutdown on a clean exit; atexit covers an exit by signal (SystemExit) too.
    atexit.register(elastic.close)
    logger.info("kvcached: scheduler pages %d blocks over %d logical pages of %.1f MiB (group %s); keeps up to %d "
                "free prefix-cache blocks while nobody needs the memory", plan.layout.num_blocks,
                plan.layout.num_logical_pages, plan.layout.logical_page_bytes / 2**20, settings.group,
                elastic.max_cached_blocks)


_installed = False


def install(kv_allocation: str = "backing") -> None:
    """Arm the patches; `kv_allocation` is the version table's word for how this vLLM allocates the KV cache."""
    global _installed
    if _installed:
        return
    if kv_allocation not in ALLOCATION_TARGETS:
        raise ValueError(f"kv_allocation must be one of {sorted(ALLOCATION_TARGETS)}, got {kv_allocation!r}")
    _installed = True
    if kv_allocation == "backing":
        for name in _WORKER_MODULES:
            when_imported(name, _patch_allocate)
    else:
        for name in ("vllm.v1.worker.gpu.attn_utils", "vllm.v1.worker.gpu.model_runner"):
            when_imported(name, _patch_per_layer_allocation)
        when_imported("vllm.v1.worker.gpu_model_runner", _patch_v1_runner_per_layer)
    when_imported("vllm.v1.worker.gpu_model_runner", _patch_model_runner)
    when_imported("vllm.v1.worker.gpu.model_runner", _patch_model_runner)
    when_imported("vllm.config.vllm", _patch_extensible_kv_cache)
    when_imported("vllm.v1.worker.gpu_worker", _patch_worker_class("Worker"))
    when_imported("vllm.v1.worker.cpu_worker", _patch_worker_class("CPUWorker"))
    when_imported("vllm.v1.core.block_pool", _patch_block_pool)
    when_imported("vllm.v1.core.kv_cache_manager", _patch_kv_cache_manager)
    when_imported("vllm.v1.core.kv_cache_coordinator", _patch_coordinator)
    when_imported("vllm.v1.core.sched.scheduler", _patch_scheduler)

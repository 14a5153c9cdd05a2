"""kvtop renders one frame from the live records."""
import signal
from pathlib import Path

from test_budget import spawn_victim

from kvcached import budget
from kvcached.budget import BudgetRecord
from kvcached.cli import kvtop

M = 1 << 20


def test_render_once_shows_pools_groups_and_dead(shm_dir, capsys):
    rec = BudgetRecord.create(1024 * M, name="llama", group="g")
    proc = spawn_victim(Path(shm_dir) / "victim.pool")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rec.try_reserve(512 * M)
    rec.set_used(256 * M, 1)
    budget.set_group_limit("g", 2048 * M)
    frame = kvtop.render_once()
    assert "llama" in frame and "512.0M" in frame and "256.0M" in frame
    assert "victim (dead)" in frame
    assert "2.0G" in frame, "the group cap is shown"
    assert "█" in frame and "▒" in frame
    assert kvtop.main(["--once"]) == 0
    assert "victim" not in capsys.readouterr().out, "kvtop reaps what dead owners left before it draws"
    rec.close()


def test_render_once_without_pools(shm_dir):
    assert "(no pools)" in kvtop.render_once()


def test_usage_bar_proportions():
    bar = kvtop.usage_bar(25, 50, 100, width=20).plain
    assert bar == "█" * 5 + "▒" * 5 + "·" * 10


def test_once_exits_zero(shm_dir, capsys):
    assert kvtop.main(["--once"]) == 0
    assert "kvcached pools" in capsys.readouterr().out
    assert kvtop.main(["--once", "--interval", "0"]) == 2


def test_prefix_stores_get_their_own_table(shm_dir):
    import numpy as np

    from kvcached.prefix_store import PrefixStore, chain_keys, model_fingerprint

    fp = model_fingerprint(model="tiny", block_size=4)
    store = PrefixStore.open("docs", fp, max_bytes=64 * M)
    (key,) = chain_keys(fp, [1, 2, 3, 4], 4)
    assert store.save_from(key, [memoryview(np.ones(4096, dtype=np.uint8))])
    frame = kvtop.render_once()
    assert "prefix stores" in frame and "docs" in frame and "64.0M" in frame

"""Shared-memory budget records: creation, limits, group caps, liveness and cleanup."""
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvcached import budget
from kvcached.budget import BudgetRecord

M = 1 << 20


def test_directory_and_files_are_private(shm_dir):
    rec = BudgetRecord.create(64 * M, name="p")
    assert stat.S_IMODE(os.stat(shm_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(rec.path).st_mode) & 0o077 == 0
    rec.close()
    assert not rec.path.exists()


def test_default_group_comes_from_ipc_name(shm_dir, monkeypatch):
    monkeypatch.setenv("KVCACHED_IPC_NAME", "team/a b")
    rec = BudgetRecord.create(M)
    assert rec.group == "team_a_b"
    monkeypatch.delenv("KVCACHED_IPC_NAME")
    other = BudgetRecord.create(M)
    assert other.group != rec.group, "without KVCACHED_IPC_NAME each pool is its own group"
    rec.close()
    other.close()
    assert sorted(os.listdir(shm_dir)) == [".create.lock"], "uncapped groups leave no files behind"


def test_limit_shrinks_and_grows_back(shm_dir):
    rec = BudgetRecord.create(64 * M, name="l")
    assert rec.try_reserve(40 * M)
    budget.set_limit("l", 30 * M)
    assert rec.over_budget() == 10 * M
    assert not rec.try_reserve(M)
    rec.release(20 * M)
    assert rec.over_budget() == 0 and rec.try_reserve(10 * M)
    budget.set_limit_percent("l", 100)
    assert rec.limit_bytes == 64 * M and rec.try_reserve(34 * M)
    assert not rec.try_reserve(1)
    rec.close()


def test_group_cap_is_shared_and_removable(shm_dir):
    a = BudgetRecord.create(64 * M, name="a", group="g")
    b = BudgetRecord.create(64 * M, name="b", group="g")
    budget.set_group_limit("g", 50 * M)
    assert a.try_reserve(30 * M)
    assert not b.try_reserve(30 * M)
    assert b.headroom() == 20 * M and b.try_reserve(20 * M)
    assert budget.group_reserved("g") == 50 * M
    a.release(30 * M)
    assert b.try_reserve(30 * M), "b grows into what a released"
    budget.set_group_limit("g", None)
    assert a.try_reserve(60 * M)
    groups = {g.name: g for g in budget.list_groups()}
    assert groups["g"].cap_bytes is None and groups["g"].members == 2
    a.close()
    b.close()


def test_unknown_group_needs_create(shm_dir):
    with pytest.raises(KeyError, match="--create"):
        budget.set_group_limit("nobody", M)
    assert budget.set_group_limit("nobody", M, create=True).cap_bytes == M
    rec = BudgetRecord.create(64 * M, name="late", group="nobody")
    assert not rec.try_reserve(2 * M), "a cap set before the engine started applies"
    rec.close()


def test_pid_reuse_is_detected_by_start_time(shm_dir):
    rec = BudgetRecord.create(M, name="r")
    rec._rec.start_time += 1  # same pid, different process start: another process owns that pid now
    (info,) = budget.list_instances()
    assert not info.alive
    rec.close()


_VICTIM = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from kvcached.budget import BudgetRecord
    pool = Path(sys.argv[1])
    pool.write_bytes(b"x" * 4096)
    rec = BudgetRecord.create(1 << 20, name="victim", group="g", pool_path=str(pool))
    rec.try_reserve(4096)
    print("ready", flush=True)
    time.sleep(60)
""")


def spawn_victim(pool: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _VICTIM, str(pool)], stdout=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_stale_record_after_sigkill_is_cleaned(shm_dir):
    pool = Path(shm_dir) / "victim.pool"
    proc = spawn_victim(pool)
    assert [i.alive for i in budget.list_instances()] == [True]
    assert budget.cleanup() == [], "live records are kept"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (info,) = budget.list_instances()
    assert not info.alive and info.reserved_bytes == 4096
    mine = BudgetRecord.create(1 << 20, name="victim", group="g")
    assert mine.name == "victim", "a dead record's name can be taken over"
    mine.close()
    proc = spawn_victim(pool)
    proc.kill()
    proc.wait()
    removed = budget.cleanup()
    assert str(pool) in removed and not pool.exists()
    assert budget.list_instances() == []

"""The admin protocol over kvcached's shared state: exact names, validated sizes, hostile files, leases, reaping."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvcached import budget
from kvcached.budget import BudgetRecord
from kvcached.budget.owner import RECORD_VERSION
from kvcached.budget.records import RECORD_MAGIC, RECORD_SIZE, RecordStruct
from kvcached.shm import ShmDirError
from kvcached.units import MAX_BYTES

M = 1 << 20


def test_instances_are_found_by_exact_name_never_by_prefix(shm_dir):
    kva = BudgetRecord.create(64 * M, name="kva")
    kvab = BudgetRecord.create(64 * M, name="kvab")
    budget.set_limit("kva", 0)
    assert kva.limit_bytes == 0 and kvab.limit_bytes == 64 * M, "a limit on kva must not touch kvab"
    with budget.lease_limit("kva", 0):
        assert kvab.limit_bytes == 64 * M
    with pytest.raises(KeyError, match="no kvcached instance named 'kv'"):
        budget.find_instance("kv")
    with pytest.raises(KeyError):
        budget.set_limit("../kva", 0)  # names are names, never paths
    kva.close()
    kvab.close()


@pytest.mark.parametrize("value", [MAX_BYTES + 1, 1 << 64, -1, float("nan"), float("inf"), 1.5, True, "1G"])
def test_limits_outside_int64_or_not_whole_bytes_are_refused(shm_dir, value):
    rec = BudgetRecord.create(64 * M, name="v")
    with pytest.raises(ValueError):
        budget.set_limit("v", value)
    assert rec.limit_bytes == 64 * M, "a refused value changes nothing"
    budget.set_limit("v", MAX_BYTES)
    assert rec.limit_bytes == MAX_BYTES
    rec.close()


def test_engines_get_their_exact_name_or_an_error(shm_dir):
    first = BudgetRecord.create(M, name="engine-x", exact=True)
    with pytest.raises(FileExistsError, match="engine-x"):
        BudgetRecord.create(M, name="engine-x", exact=True)
    shared = BudgetRecord.create(M, name="engine-x")  # not exact: a suffix, as before
    assert shared.name == "engine-x-2"
    first.close()
    shared.close()


def _write_record_file(path: Path, **fields) -> None:
    rec = RecordStruct(magic=RECORD_MAGIC, version=RECORD_VERSION, pid=1, start_time=0, limit_bytes=M,
                       virtual_bytes=M, lease_limit_bytes=-1, name=path.stem.encode(), group=b"g")
    for key, value in fields.items():
        setattr(rec, key, value)
    path.write_bytes(bytes(rec))


@pytest.mark.faults
def test_hostile_records_are_reported_not_decoded(shm_dir, capsys):
    from kvcached.cli import kvctl, kvtop

    d = Path(shm_dir)
    good = BudgetRecord.create(M, name="good")
    _write_record_file(d / "badutf.rec", name=b"bad\xffutf")
    (d / "trunc.rec").write_bytes(RECORD_MAGIC + b"\x00" + b"\x00" * 40)
    (d / "garbage.rec").write_bytes(os.urandom(RECORD_SIZE))
    _write_record_file(d / "neg.rec", reserved_bytes=-5)
    assert [i.name for i in budget.list_instances()] == ["good"]
    bad = {u.name: u for u in budget.list_unreadable()}
    assert set(bad) == {"badutf", "trunc", "garbage", "neg"}
    assert "UTF-8" in bad["badutf"].reason and "bytes" in bad["trunc"].reason
    assert kvctl.main(["list"]) == 0 and kvtop.main(["--once"]) == 0
    out = capsys.readouterr().out
    assert "good" in out
    # Their writers are gone (pid 1's start time is not 0, or the bytes name no process): cleanup removes them.
    kvctl.main(["cleanup"])
    assert budget.list_unreadable() == [] and [i.name for i in budget.list_instances()] == ["good"]
    good.close()


@pytest.mark.faults
def test_cleanup_deletes_only_what_the_dead_owner_created(shm_dir, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    d = Path(shm_dir)
    # A forged dead record naming a file outside the directory as its pool.
    _write_record_file(d / "forged.rec", pid=999_999_999, start_time=1, pool_path=str(precious).encode())
    (d / "forged.pool").write_bytes(b"x")  # the pool file its owner would have made
    (d / "forged-other.pool").write_bytes(b"x")  # someone else's
    removed = budget.cleanup()
    assert precious.read_text() == "keep me"
    assert not (d / "forged.rec").exists() and not (d / "forged.pool").exists()
    assert (d / "forged-other.pool").exists()
    assert str(precious) not in removed


@pytest.mark.faults
def test_a_symlink_is_never_followed(shm_dir, tmp_path):
    target = tmp_path / "target.rec"
    BudgetRecord.create(M, name="real").close()
    _write_record_file(target)
    os.symlink(target, Path(shm_dir) / "link.rec")
    assert [u.name for u in budget.list_unreadable()] == ["link"]
    with pytest.raises(KeyError):
        budget.set_limit("link", 0)
    assert target.read_bytes()[:7] == RECORD_MAGIC
    assert RecordStruct.from_buffer_copy(target.read_bytes()).limit_bytes == M


def test_the_shm_directory_must_be_private(tmp_path, monkeypatch):
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    os.chmod(open_dir, 0o777)
    monkeypatch.setenv("KVCACHED_SHM_DIR", str(open_dir))
    with pytest.raises(ShmDirError, match=f"chmod 700 {open_dir}"):
        BudgetRecord.create(M, name="x")
    with pytest.raises(ShmDirError):
        budget.list_instances()
    link = tmp_path / "link"
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.symlink(private, link)
    monkeypatch.setenv("KVCACHED_SHM_DIR", str(link))
    with pytest.raises(ShmDirError, match="symbolic link"):
        BudgetRecord.create(M, name="x")
    if os.geteuid() == 0:  # only root can hand a directory to another user
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        monkeypatch.setenv("KVCACHED_SHM_DIR", str(theirs))
        with pytest.raises(ShmDirError, match="belongs to uid 65534"):
            budget.list_instances()


def test_kvctl_refuses_sizes_past_int64_with_exit_2(shm_dir, capsys):
    from kvcached.cli import kvctl

    rec = BudgetRecord.create(64 * M, name="k")
    for bad in ("9223372036854775808", "16384P", "8E", "nan", "inf", "1e30"):
        assert kvctl.main(["limit", "k", bad]) == 2, bad
        assert rec.limit_bytes == 64 * M
    assert "2^63-1" in capsys.readouterr().err
    assert kvctl.main(["limit", "k", "9223372036854775807"]) == 0
    assert rec.limit_bytes == MAX_BYTES
    rec.close()


# ---- leases ---------------------------------------------------------------------------------------------------

def test_a_lease_lowers_the_limit_until_released(shm_dir):
    rec = BudgetRecord.create(64 * M, name="l")
    assert rec.try_reserve(10 * M)
    lease = budget.lease_limit("l", 0, ttl_s=30)
    assert rec.limit_bytes == 0 and rec.over_budget() == 10 * M
    info = budget.find_instance("l")
    assert info.limit_bytes == 64 * M and info.effective_limit_bytes == 0 and info.lease_holder_pid == os.getpid()
    budget.set_limit("l", 32 * M)  # the pool's own limit changes underneath; the lease still binds
    assert rec.limit_bytes == 0
    lease.release()
    assert rec.limit_bytes == 32 * M, "nothing saved, nothing restored: the pool's own limit binds again"
    rec.close()


def test_an_expired_lease_stops_binding(shm_dir):
    rec = BudgetRecord.create(64 * M, name="e")
    budget.lease_limit("e", 0, ttl_s=0.2)
    assert rec.limit_bytes == 0
    time.sleep(0.4)
    assert rec.limit_bytes == 64 * M
    rec.close()


@pytest.mark.faults
def test_the_limit_comes_back_when_the_lease_holder_dies(shm_dir):
    rec = BudgetRecord.create(64 * M, name="d")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from kvcached import budget
        budget.lease_limit("d", 0, ttl_s=3600)
        print("held", flush=True)
        time.sleep(3600)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "KVCACHED_SHM_DIR": shm_dir})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert rec.limit_bytes == 0
        holder.send_signal(signal.SIGKILL)  # a router killed while a model sleeps
        holder.wait(10)
        time.sleep(0.6)  # liveness is cached for half a second
        assert rec.limit_bytes == 64 * M, "the lowered limit ends with its holder, with no one to restore it"
    finally:
        holder.kill()
    rec.close()


# ---- nothing stale accumulates --------------------------------------------------------------------------------

@pytest.mark.faults
def test_records_of_killed_owners_are_reaped(shm_dir):
    code = textwrap.dedent("""
        import os, signal
        from kvcached.budget import BudgetRecord
        BudgetRecord.create(1 << 20, name=f"dead-{os.getpid()}", group=f"grp-{os.getpid()}")
        os.kill(os.getpid(), signal.SIGKILL)  # no close, as when vLLM force-kills its EngineCore
    """)
    for _ in range(5):
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "KVCACHED_SHM_DIR": shm_dir})
    # Each start reaped the one killed before it: only the last victim's record and group are left.
    assert len([n for n in os.listdir(shm_dir) if n.endswith((".rec", ".group"))]) == 2
    live = BudgetRecord.create(M, name="live")  # a kvcached process starting in the directory reaps
    left = {n for n in os.listdir(shm_dir) if not n.startswith(".") and not n.endswith(".lock")}
    assert left == {"live.rec", f"{live.group}.group"}, left
    live.close()


def test_reaping_never_takes_a_live_record_or_a_capped_group(shm_dir):
    a = BudgetRecord.create(M, name="a", group="g")
    budget.set_group_limit("later", 8 * M, create=True)  # a cap placed before its engines start
    budget.reap()
    assert [i.name for i in budget.list_instances()] == ["a"]
    assert {g.name for g in budget.list_groups()} == {"g", "later"}
    a.close()
    budget.set_group_limit("later", None)


def test_the_group_cap_on_the_map_path_follows_writes_and_replacements(shm_dir, monkeypatch):
    """Every map asks for the group cap, so the owner reads it through one open fd: a cap written in place binds at
    once; a group file replaced (removed with its group, recreated) is noticed within the revalidation period; a
    garbage file is no cap at all, never a crash."""
    from kvcached.budget.records import GroupCapReader, group_path

    monkeypatch.setattr(GroupCapReader, "REVALIDATE_S", 0.0)  # revalidate on every read
    rec = BudgetRecord.create(8 * M, name="capped", group="caps", page_bytes=M)
    try:
        assert rec.group_cap is None
        budget.set_group_limit("caps", 3 * M)
        assert rec.group_cap == 3 * M and not rec.try_reserve(4 * M) and rec.try_reserve(3 * M)
        rec.release(3 * M)
        path = group_path(Path(shm_dir), "caps")
        path.unlink()
        assert rec.group_cap is None, "a removed group file is no cap"
        budget.set_group_limit("caps", 2 * M, create=True)  # a new file, a new inode
        assert rec.group_cap == 2 * M
        path.unlink()
        path.write_bytes(b"garbage")
        assert rec.group_cap is None
    finally:
        rec.close()

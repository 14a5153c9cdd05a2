"""kvctl against real records: listing, limits, bad input (exit 2, nothing changed), cleanup after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_budget import spawn_victim

from kvcached import budget
from kvcached.budget import BudgetRecord
from kvcached.cli import kvctl

M = 1 << 20


@pytest.fixture
def pools(shm_dir):
    a = BudgetRecord.create(1024 * M, name="llama", group="shared")
    b = BudgetRecord.create(512 * M, name="qwen", group="shared")
    a.try_reserve(300 * M)
    a.set_used(200 * M, 2)
    yield a, b
    a.close()
    b.close()


def test_list_json(pools, capsys):
    assert kvctl.main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["llama", "qwen"]
    llama = rows[0]
    assert llama["group"] == "shared" and llama["pid"] == os.getpid()
    assert llama["used_bytes"] == 200 * M and llama["reserved_bytes"] == 300 * M
    assert llama["limit_bytes"] == 1024 * M and llama["alive"] is True


def test_list_table(pools, capsys):
    assert kvctl.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "300.0M" in out and "alive" in out


def test_limits(pools, capsys):
    a, b = pools
    assert kvctl.main(["limit", "llama", "512M"]) == 0
    assert a.limit_bytes == 512 * M
    assert kvctl.main(["limit", "llama", "none"]) == 0
    assert a.limit_bytes == 1024 * M
    assert kvctl.main(["limit-percent", "qwen", "25%"]) == 0
    assert b.limit_bytes == 128 * M
    assert kvctl.main(["group-limit", "shared", "1G"]) == 0
    assert a.group_cap == 1024 * M
    assert kvctl.main(["group-limit", "shared", "none"]) == 0
    assert a.group_cap is None


@pytest.mark.parametrize("argv,message", [
    (["limit", "nobody", "1G"], "no kvcached instance named 'nobody'"),
    (["limit", "llama", "12X"], "invalid size '12X'"),
    (["limit", "llama", "-1G"], "cannot be negative"),
    (["limit-percent", "llama", "150"], "invalid percentage"),
    (["limit-percent", "nobody", "50"], "no kvcached instance"),
    (["group-limit", "shared", "-5M"], "cannot be negative"),
    (["group-limit", "nogroup", "1G"], "no kvcached group named 'nogroup'"),
])
def test_bad_input_exits_2_and_changes_nothing(pools, capsys, argv, message):
    before = [(i.name, i.limit_bytes) for i in budget.list_instances()], [g.to_dict() for g in budget.list_groups()]
    assert kvctl.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    after = [(i.name, i.limit_bytes) for i in budget.list_instances()], [g.to_dict() for g in budget.list_groups()]
    assert after == before


def test_console_script_and_help(pools):
    exe = Path(sys.executable).with_name("kvctl")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0 and "kvctl limit llama-0 2G" in out.stdout
    bad = subprocess.run([str(exe), "limit", "llama", "12X"], capture_output=True, text=True, env=os.environ.copy())
    assert bad.returncode == 2 and "invalid size" in bad.stderr


def test_kvctl_reaps_what_a_killed_owner_left(shm_dir, capsys):
    pool = Path(shm_dir) / "victim.pool"
    proc = spawn_victim(pool)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (info,) = budget.list_instances()
    assert not info.alive, "reading changes nothing: the library lists the dead record"
    assert kvctl.main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [], "kvctl reaps what dead owners left before it lists"
    assert not pool.exists() and not (Path(shm_dir) / "victim.rec").exists()
    assert kvctl.main(["cleanup"]) == 0 and "nothing to clean up" in capsys.readouterr().out

"""kvlab.engines.launcher on a plain process tree (no vLLM): the tree dies with the launching process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from process_watch import live, wait_gone

from kvlab.engines.server import VLLMServer

# A stand-in for vLLM: a process with two children, one of which has a child of its own (4 in all).
TREE = [sys.executable, "-c", "import subprocess, time, sys; "
        "subprocess.Popen(['sleep', '300']); "
        "subprocess.Popen([sys.executable, '-c', 'import subprocess, time; subprocess.Popen([\"sleep\", \"300\"]); time.sleep(300)']); "
        "time.sleep(300)"]


def tree_of(pid: int, size: int, timeout: float = 10) -> list[int]:
    """The pids under `pid` once `size` descendants exist."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = [p.pid for p in psutil.Process(pid).children(recursive=True)]
        if len(kids) >= size:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"tree under {pid} never reached {size} processes")


def test_sigterm_stops_the_whole_group_and_reports_it():
    launcher = subprocess.Popen([sys.executable, "-m", "kvlab.engines.launcher", "--grace", "2", "--", *TREE],
                                start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        tree = tree_of(launcher.pid, 4)
    finally:
        launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=10) == 128 + signal.SIGTERM
    assert wait_gone(tree, 5) == []
    assert "stopping" in launcher.stderr.read()


def test_the_tree_dies_when_the_launching_process_is_sigkilled(tmp_path):
    parent_script = tmp_path / "parent.py"
    parent_script.write_text(textwrap.dedent(f"""
        import json, subprocess, sys, time
        # stderr to a pipe that dies with this process: the launcher's report must not break its clean-up.
        launcher = subprocess.Popen([sys.executable, "-m", "kvlab.engines.launcher", "--grace", "2", "--", *{TREE!r}],
                                    start_new_session=True, stderr=subprocess.PIPE)
        print(launcher.pid, flush=True)
        time.sleep(300)
    """))
    parent = subprocess.Popen([sys.executable, str(parent_script)], stdout=subprocess.PIPE, text=True)
    try:
        launcher_pid = int(parent.stdout.readline())
        tree = [launcher_pid, *tree_of(launcher_pid, 4)]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert wait_gone(tree, 10) == [], "processes outlived their launching parent"
    finally:
        parent.kill()  # a failed test must not leave its parent (and so the tree) running


def test_exit_code_of_the_command_is_passed_through():
    rc = subprocess.run([sys.executable, "-m", "kvlab.engines.launcher", "--", sys.executable, "-c", "raise SystemExit(7)"],
                        timeout=30).returncode
    assert rc == 7


def test_a_missing_command_says_so():
    out = subprocess.run([sys.executable, "-m", "kvlab.engines.launcher", "--", "no-such-command-kvlab"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 127 and "cannot run 'no-such-command-kvlab'" in out.stderr


def test_the_tree_survives_the_exit_of_the_launching_thread(tmp_path):
    # PR_SET_PDEATHSIG fires when the launching *thread* exits; a server started from a worker thread
    # must live on while its process does.
    parent_script = tmp_path / "threaded_parent.py"
    parent_script.write_text(textwrap.dedent(f"""
        import subprocess, sys, threading, time
        def launch():
            launcher = subprocess.Popen([sys.executable, "-m", "kvlab.engines.launcher", "--grace", "2", "--",
                                         *{TREE!r}], start_new_session=True)
            print(launcher.pid, flush=True)
        t = threading.Thread(target=launch)
        t.start(); t.join()
        print("thread gone", flush=True)
        time.sleep(300)
    """))
    parent = subprocess.Popen([sys.executable, str(parent_script)], stdout=subprocess.PIPE, text=True)
    try:
        launcher_pid = int(parent.stdout.readline())
        tree = [launcher_pid, *tree_of(launcher_pid, 4)]
        assert parent.stdout.readline().strip() == "thread gone"
        time.sleep(1.0)  # several of the launcher's polls
        assert live(tree) == tree, "the launcher stopped when only its launching thread exited"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert wait_gone(tree, 10) == []
    finally:
        parent.kill()


@pytest.mark.faults
def test_a_parent_gone_before_the_launcher_starts_means_nothing_starts(tmp_path):
    # The launcher's real parent (this test) is alive, but it was told of another: to the launcher that is the
    # same as having been reparented to a reaper before it ran, which os.getppid() at start cannot tell.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    marker = tmp_path / "started"
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close(); import time; time.sleep(300)"]
    out = subprocess.run([sys.executable, "-m", "kvlab.engines.launcher", "--parent-pid", str(gone.pid), "--", *cmd],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and f"parent {gone.pid} is gone" in out.stderr
    assert not marker.exists()


@pytest.mark.faults
def test_a_parent_that_exits_while_the_launcher_starts_leaves_nothing(tmp_path):
    pid_file, log = tmp_path / "cmd.pid", tmp_path / "launcher.log"
    parent_script = tmp_path / "parent.py"
    parent_script.write_text(textwrap.dedent(f"""
        import os, subprocess, sys
        cmd = [sys.executable, "-c", "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
               "time.sleep(300)"]
        with open({str(log)!r}, "w") as log:
            launcher = subprocess.Popen([sys.executable, "-m", "kvlab.engines.launcher", "--grace", "2",
                                         "--parent-pid", str(os.getpid()), "--", *cmd],
                                        start_new_session=True, stderr=log)
        print(launcher.pid, flush=True)
        os._exit(0)  # at once: the launcher is still importing Python
    """))
    parent = subprocess.Popen([sys.executable, str(parent_script)], stdout=subprocess.PIPE, text=True)
    launcher_pid = int(parent.stdout.readline())
    parent.wait()
    try:
        assert wait_gone([launcher_pid], 15) == [], "the launcher outlived its parent"
    finally:
        started = [int(pid_file.read_text())] if pid_file.exists() and pid_file.read_text() else []
        left = wait_gone(started, 10)
        for pid in live([launcher_pid, *left]):  # a failed test must not leave the command running
            os.kill(pid, signal.SIGKILL)
    assert left == []
    report = log.read_text()
    assert "is gone" in report or "parent died" in report, report


class SleeperServerDouble(VLLMServer):
    """A test double of a vLLM server: one sleeping process under the real launcher."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(300)"]


def test_a_server_tells_its_launcher_who_its_parent_is(tmp_path):
    server = SleeperServerDouble("double", log_dir=tmp_path, progress=False).start(wait=False)
    try:
        cmdline = psutil.Process(server.launcher_pid).cmdline()
        assert cmdline[cmdline.index("--parent-pid") + 1] == str(os.getpid())
        assert cmdline.index("--parent-pid") < cmdline.index("--")
    finally:
        server.stop(timeout=5)

"""Run a command so that it cannot outlive the process that launched it.

    python -m kvlab.engines.launcher [--grace SECONDS] [--parent-pid PID] -- CMD [ARGS...]

Why a separate process: a Jupyter kernel killed with SIGKILL runs no cleanup, and vLLM's own children
(EngineCore, workers) would live on holding gigabytes. The launcher stays small and outside the command's
process group, so it can kill that whole group:

- the command runs in a new process group (its pgid is its pid); vLLM's children inherit that group;
- the launcher asks the kernel for a death signal (PR_SET_PDEATHSIG) when its parent dies, and also polls
  its parent id, because the death signal fires when the parent *thread* exits, and is lost on a race
  at start-up;
- the parent passes its pid (`--parent-pid`): a parent that dies while the launcher is still starting has
  already handed it to a reaper, so os.getppid() at start would take the reaper for the parent and never
  notice. Given a parent that is not (or no longer) its parent, the launcher starts nothing;
- on SIGTERM/SIGINT (a normal stop), or when its parent is gone, it sends SIGTERM to the group, waits
  `--grace` seconds, then SIGKILLs the group and any descendant that left it;
- when the command exits on its own, it kills what the command left behind and exits with its code.
The command itself also gets a death signal (SIGTERM) for the launcher, so even a SIGKILLed launcher
leaves vLLM's API server shutting its engine down.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
# A signal of its own, not SIGTERM: a death signal must be told apart from a stop request, since it also
# fires when only the launching thread exits while the launching process lives on.
PARENT_DEATH_SIGNAL = signal.SIGUSR1
POLL_S = 0.2
DEFAULT_GRACE_S = 5.0


def set_parent_death_signal(sig: int) -> None:
    """Ask Linux to send `sig` to this process when its parent (thread) exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _descendants(pid: int) -> list:
    """Every live descendant of `pid` (psutil processes); empty when psutil is missing or pid is gone."""
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:
        return []


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def terminate(child: subprocess.Popen, grace: float) -> None:
    """SIGTERM the child's process group, wait up to `grace` s, then SIGKILL the group and stragglers."""
    pgid = child.pid
    # Taken before the first signal: once the API server dies, its children are reparented and no longer
    # show up as our descendants. They stay in the group unless they called setsid(); this catches those.
    stragglers = _descendants(os.getpid())
    _kill_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if child.poll() is not None and not _group_alive(pgid):
            break
        time.sleep(POLL_S)
    _kill_group(pgid, signal.SIGKILL)
    for proc in stragglers:
        try:
            proc.kill()
        except Exception:
            pass
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def _child_preexec() -> None:
    # The command dies with the launcher even if the launcher is SIGKILLed itself.
    set_parent_death_signal(signal.SIGTERM)


def run(cmd: list[str], grace: float = DEFAULT_GRACE_S, parent_pid: int | None = None) -> int:
    """Run `cmd` until it exits, the launcher is asked to stop, or `parent_pid` (default: the parent at start)
    is no longer the launcher's parent."""
    original_parent = os.getppid() if parent_pid is None else parent_pid
    if os.getppid() != original_parent:
        _say(f"parent {original_parent} is gone (this process now belongs to {os.getppid()}): not starting "
             f"{cmd[0]!r}")
        return 1
    stop_reason: list[str] = []

    def on_stop(signum: int, _frame) -> None:
        stop_reason.append(signal.Signals(signum).name)

    def on_parent_death(_signum: int, _frame) -> None:
        if os.getppid() != original_parent:
            stop_reason.append("parent died")

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_stop)
    signal.signal(PARENT_DEATH_SIGNAL, on_parent_death)
    set_parent_death_signal(PARENT_DEATH_SIGNAL)
    if os.getppid() != original_parent:  # the parent died before prctl took effect
        return 1

    try:
        child = subprocess.Popen(cmd, process_group=0, preexec_fn=_child_preexec)
    except FileNotFoundError as e:
        _say(f"cannot run {cmd[0]!r}: {e}")
        return 127
    returncode: int | None = None
    try:
        while returncode is None:
            try:
                returncode = child.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                pass
            if returncode is None and not stop_reason and os.getppid() != original_parent:
                stop_reason.append("parent died")
            if returncode is None and stop_reason:
                _say(f"stopping {child.pid} ({stop_reason[0]})")
                break
    finally:
        # Reached on a stop request, when the command exits by itself (whatever it left in its group must
        # not linger), and on any error in this loop: the group never outlives the launcher.
        if returncode is None or _group_alive(child.pid):
            terminate(child, grace)
    if returncode is None:
        returncode = child.returncode if child.returncode is not None else -signal.SIGTERM
    return _exit_status(returncode)


def _say(message: str) -> None:
    """Report on stderr, which may be a pipe whose reader is gone: that must not stop the clean-up."""
    try:
        print(f"kvlab.engines.launcher: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass


def _exit_status(returncode: int) -> int:
    """Popen's -N (killed by signal N) as a shell would report it, 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvlab.engines.launcher", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                        help="seconds between SIGTERM and SIGKILL of the command's process group")
    parser.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                        help="the launching process: when it is gone (even before the launcher runs), stop "
                             "(default: the parent at start)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given: python -m kvlab.engines.launcher -- CMD [ARGS...]")
    if args.parent_pid is not None and args.parent_pid <= 1:
        parser.error(f"--parent-pid must be the launching process's pid, got {args.parent_pid}")
    return run(cmd, args.grace, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())

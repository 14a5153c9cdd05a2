"""Which of a set of processes are still running: the no-orphan checks of the launcher, server and router tests."""
from __future__ import annotations

import time

import psutil


def live(pids: list[int]) -> list[int]:
    """The pids still running (a zombie has exited: only its parent's wait is missing)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to `timeout` seconds for every pid to exit; returns those still running."""
    deadline = time.monotonic() + timeout
    while live(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live(pids)

"""`kvlab serve` shuts down every engine even when a second SIGTERM or Ctrl-C arrives while it stops them.

A real `kvlab serve` starts vLLM (minutes), so the engines here are a test double of the fleet: sleeping
processes, with a stop that waits for the test's go. The serve process runs `kvlab.commands.serve.supervise`,
the function that installs the signal handlers, in a child, so that the signals never reach pytest.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest
from process_watch import live, wait_gone

from kvlab.engines.ports import free_port

CHILD = textwrap.dedent("""
    import subprocess, sys
    from kvlab.commands.serve import supervise, wait_for_signal

    phase, port = sys.argv[1], int(sys.argv[2])


    class EnginesDouble:
        '''A test double of kvlab.engines.fleet.Fleet: sleeping processes, and a stop that waits for the test.'''

        def __init__(self):
            self.procs = []

        def start(self):
            # Not on our pipes: the test reads them to their end.
            self.procs = [subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL) for _ in range(3)]
            print(*[p.pid for p in self.procs], flush=True)

        def stop(self):
            print("double: stopping", flush=True)
            sys.stdin.readline()  # the test's go, sent once the second signal has been noted
            for p in self.procs:
                p.terminate()
                p.wait()
            print("double: stopped", flush=True)


    fleet = EnginesDouble()


    def work():
        fleet.start()
        if phase == "router":
            from kvlab.router.app import Router
            from kvlab.router.runner import run_router

            run_router(Router([]), "127.0.0.1", port)
        else:
            wait_for_signal()
        return 0


    sys.exit(supervise(fleet, work))
""")


class Lines:
    """The lines of a child's pipe, read on a thread, so that a test waits for one with a deadline."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put("")  # the end of the stream

    def until(self, text: str, timeout: float = 30) -> None:
        """Wait for a line holding `text`; AssertionError (with what came) if the stream ends or time runs out."""
        seen = ""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {timeout} s; the serve process wrote: {seen}") from None
            assert line, f"the serve process ended before {text!r}; it wrote: {seen}"
            seen += line
            if text in line:
                return


def _wait_http(url: str, child: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"the router never answered at {url}")


@pytest.mark.faults
@pytest.mark.parametrize("phase", ["router", "waiting"])
@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_during_the_stop_neither_cuts_it_short_nor_leaves_an_engine(phase, second):
    port = free_port()
    child = subprocess.Popen([sys.executable, "-c", CHILD, phase, str(port)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    engines: list[int] = []
    try:
        engines = [int(pid) for pid in child.stdout.readline().split()]
        assert len(engines) == 3, child.stderr.read()
        out, err = Lines(child.stdout), Lines(child.stderr)
        if phase == "router":
            _wait_http(f"http://127.0.0.1:{port}/health", child)
        child.send_signal(signal.SIGTERM)
        out.until("double: stopping")
        child.send_signal(second)
        err.until("already stopping")
        child.stdin.write("go\n")
        child.stdin.flush()
        out.until("double: stopped")
        assert child.wait(timeout=30) == 0
        assert wait_gone(engines, 10) == []
    finally:
        child.kill()
        child.wait()
        for pid in live(engines):  # a failed test must not leave its engines running
            os.kill(pid, signal.SIGKILL)

"""Ports handed out on one node: two processes asking at once never get the same one (sweep runs share nodes), a
reservation ends with its holder or its age, and a reservations directory others could write is not trusted."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvcached.processes import process_start_time
from kvlab.engines import ports


@pytest.fixture
def reservations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "ports"
    monkeypatch.setenv("KVLAB_PORTS_DIR", str(directory))
    monkeypatch.setattr(ports, "_ports_handed_out", set())
    return directory


def _kernel_offers(monkeypatch: pytest.MonkeyPatch, *offers: int) -> None:
    """The kernel's next picks for an unbound port, in order (what two processes racing would both be offered)."""
    queue = list(offers)
    monkeypatch.setattr(ports, "_unbound_port", lambda host: queue.pop(0))


def _reserve_as(directory: Path, port: int, pid: int, started: int | None, taken: float) -> None:
    directory.mkdir(mode=0o700, exist_ok=True)
    (directory / str(port)).write_text(f"{pid} {started} {taken}\n")


def test_a_port_another_live_process_took_is_skipped(reservations: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = os.getppid()  # alive for the whole test
    _reserve_as(reservations, 41001, other, process_start_time(other), time.time())
    _kernel_offers(monkeypatch, 41001, 41002)
    assert ports.free_port() == 41002
    holder = (reservations / "41002").read_text().split()
    assert int(holder[0]) == os.getpid() and int(holder[1]) == process_start_time(os.getpid())


def test_reservations_of_dead_or_old_holders_are_taken_over(reservations: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    _reserve_as(reservations, 41011, dead_pid, 12345, time.time())
    other = os.getppid()
    _reserve_as(reservations, 41012, other, process_start_time(other), time.time() - ports.RESERVATION_S - 1)
    _reserve_as(reservations, 41013, other, (process_start_time(other) or 0) + 1, time.time())  # pid reused
    _kernel_offers(monkeypatch, 41011, 41012, 41013)
    assert [ports.free_port() for _ in range(3)] == [41011, 41012, 41013]


def test_malformed_reservations_count_only_while_young(reservations: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reservations.mkdir(mode=0o700)
    (reservations / "41021").write_text("garbage")
    old = reservations / "41022"
    old.write_text("\x00" * 5000)
    os.utime(old, (time.time() - ports.RESERVATION_S - 5,) * 2)
    _kernel_offers(monkeypatch, 41021, 41022)
    assert ports.free_port() == 41022


def test_a_directory_others_can_write_is_not_trusted(reservations: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reservations.mkdir(mode=0o700)
    os.chmod(reservations, 0o777)
    (reservations / "41031").write_text(f"{os.getppid()} {process_start_time(os.getppid())} {time.time()}")
    _kernel_offers(monkeypatch, 41031)
    assert ports.free_port() == 41031  # its files are ignored, not obeyed
    assert sorted(p.name for p in reservations.iterdir()) == ["41031"]


def test_processes_asking_at_once_get_distinct_ports(reservations: Path) -> None:
    # Every asker stays alive until all have their ports, as a server's launcher does while its server runs: a
    # reservation ends with its holder, so a port of one that already exited may rightly be handed out again.
    code = ("import sys; from kvlab.engines.ports import free_port; "
            "print(' '.join(str(free_port()) for _ in range(40)), flush=True); sys.stdin.read()")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=os.environ) for _ in range(4)]
    try:
        handed = [int(p) for proc in procs for p in proc.stdout.readline().split()]
    finally:
        for proc in procs:
            proc.communicate(timeout=120)  # closes its stdin: it exits
    assert len(handed) == 160 and len(set(handed)) == 160
    assert len([p for p in reservations.iterdir() if p.name.isdigit()]) == 160


def test_one_process_at_a_time_takes_over_a_stale_reservation(reservations: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Two askers find the same stale reservation; the check is slowed so both are inside it at once. Exactly one
    # may take the port over: the other must then see the first one's fresh reservation, not remove it.
    import threading

    reservations.mkdir(mode=0o700)
    (reservations / "41041").write_text("stale\n")
    real_alive = ports._holder_alive

    def slow_alive(path: Path) -> bool:
        if path.read_text() == "stale\n":
            time.sleep(0.3)
            return False
        return real_alive(path)

    monkeypatch.setattr(ports, "_holder_alive", slow_alive)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(ports._reserve(41041))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]

"""TCP ports for servers: a free one to hand out, and whether one is taken.

A port is free once nobody listens on it, but a server binds only after it starts. Two processes on one node (two
sweep runs, two notebooks) that each ask the kernel for a free port can be handed the same one in that gap. So a
port handed out is also reserved on the node: a file named after it in a per-user directory, holding the pid and
start time of the process that took it. Another process skips a port whose holder still runs and took it less
than RESERVATION_S ago (by then its server listens, and the kernel stops offering it).
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

from kvcached.processes import process_start_time

RESERVATION_S = 600.0  # longer than any server takes to bind its port after start (vLLM binds before loading)
_ports_lock = threading.Lock()
_warned_untrusted: list[bool] = []
log = logging.getLogger(__name__)
_ports_handed_out: set[int] = set()


def reservations_dir() -> Path:
    """Where this user's port reservations live on this node ($KVLAB_PORTS_DIR, else a private temp folder)."""
    return Path(os.environ.get("KVLAB_PORTS_DIR") or Path(tempfile.gettempdir()) / f"kvlab-ports-{os.getuid()}")


def _private_dir() -> Path | None:
    """The reservations directory, created mode 700; None when it is not ours to trust (another owner, a link,
    loose permissions), and then reservations are skipped rather than read from a place others can write."""
    path = reservations_dir()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path


def _holder_alive(path: Path) -> bool:
    """Whether the reservation at `path` still counts: its holder runs (same pid and start time) and took the port
    less than RESERVATION_S ago. Anything unreadable or malformed counts only while it is young."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64:
            return time.time() - st.st_mtime < RESERVATION_S
        fields = path.read_text().split()
        pid, started, taken = int(fields[0]), int(fields[1]), float(fields[2])
    except FileNotFoundError:
        return False
    except (OSError, ValueError, IndexError):
        try:
            return time.time() - os.lstat(path).st_mtime < RESERVATION_S
        except OSError:
            return False
    return process_start_time(pid) == started and 0 <= time.time() - taken < RESERVATION_S


def _prune(directory: Path, keep: int = 256) -> None:
    """Drop reservations that no longer count once there are more than `keep` (each hand-out leaves one file)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    if len(names) <= keep:
        return
    for name in names:
        path = directory / name
        if name.isdigit() and not _holder_alive(path):
            try:
                path.unlink()
            except OSError:
                pass


def _reserve(port: int) -> bool:
    """Reserve `port` on this node for this process: True when it is ours now."""
    directory = _private_dir()
    if directory is None:
        if not _warned_untrusted:
            _warned_untrusted.append(True)
            log.warning("port reservations are off: %s is not a private directory of this user, so two processes "
                        "on this node could be handed the same port (set KVLAB_PORTS_DIR to one)", reservations_dir())
        return True  # nowhere safe to coordinate: fall back to the in-process guard alone
    try:
        lock_fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return True
    try:
        # One process at a time decides: two finding the same stale reservation must not both take it over.
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        _prune(directory)
        return _reserve_locked(directory / str(port))
    finally:
        os.close(lock_fd)


def _reserve_locked(path: Path) -> bool:
    me = f"{os.getpid()} {process_start_time(os.getpid())} {time.time():.3f}\n"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            if _holder_alive(path):
                return False
            try:
                path.unlink()  # a stale reservation: its holder is gone or took the port long ago
            except FileNotFoundError:
                pass
            continue
        except OSError:
            return True
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def _unbound_port(host: str) -> int:
    """A port the kernel would give a listener now (free this instant, not reserved by anyone)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, never the same twice in this process (servers start one by one, so two
    servers asked for a port before either binds must not get the same one), nor handed to another process on this
    node that still waits to bind it."""
    with _ports_lock:
        for _ in range(200):
            port = _unbound_port(host)
            if port not in _ports_handed_out and _reserve(port):
                _ports_handed_out.add(port)
                return port
    raise RuntimeError("no free TCP port found")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As uvicorn binds: a port whose last server just exited (TIME_WAIT) is free, one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False

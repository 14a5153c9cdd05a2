"""The on-disk format of budget records and group caps, and reading them back as hostile input.

Each record is a fixed-size C struct in its own small file under the shm directory, mmapped by its owner. The owner
updates `reserved_bytes` on every page map/unmap, so the hot path must be a memory store, not a file rewrite; every
field is an aligned 8-byte integer written with one store, so a reader never sees a torn value. Records appear
atomically (written to a temporary file, then renamed), so readers never see half a record.

Liveness: a record stores its pid and the process start time from /proc/PID/stat, so a reused pid is not mistaken
for the original owner.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

RECORD_SUFFIX = ".rec"
GROUP_SUFFIX = ".group"
LOCK_SUFFIX = ".lock"
CREATE_LOCK = ".create.lock"
RECORD_MAGIC = b"KVCREC2"  # 2: no heartbeat field (liveness is pid + start time)
GROUP_MAGIC = b"KVCGRP1"
_ALIVE_TTL_S = 0.5


class RecordStruct(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_char * 8),
        ("version", ctypes.c_int64),
        ("pid", ctypes.c_int64),
        ("start_time", ctypes.c_int64),
        ("used_bytes", ctypes.c_int64),
        ("reserved_bytes", ctypes.c_int64),
        ("limit_bytes", ctypes.c_int64),
        ("virtual_bytes", ctypes.c_int64),
        ("page_bytes", ctypes.c_int64),
        ("used_pages", ctypes.c_int64),
        ("reserved_pages", ctypes.c_int64),
        ("created", ctypes.c_double),
        ("name", ctypes.c_char * 128),
        ("group", ctypes.c_char * 128),
        ("backend", ctypes.c_char * 16),
        ("pool_path", ctypes.c_char * 512),
    ]


class GroupStruct(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_char * 8),
        ("cap_bytes", ctypes.c_int64),  # -1: no cap
        ("updated", ctypes.c_double),
        ("name", ctypes.c_char * 128),
    ]


@dataclass(frozen=True)
class InstanceInfo:
    """A snapshot of one pool's record, as `kvctl list` and kvtop show it."""

    name: str
    group: str
    pid: int
    start_time: int
    used_bytes: int
    reserved_bytes: int
    limit_bytes: int
    virtual_bytes: int
    page_bytes: int
    used_pages: int
    reserved_pages: int
    created: float
    backend: str
    pool_path: str
    alive: bool
    path: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GroupInfo:
    """A group's cap (None: uncapped) and the totals of its live members."""

    name: str
    cap_bytes: int | None
    members: int
    used_bytes: int
    reserved_bytes: int
    limit_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat); None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: fields after it start past the last ')'.
    rest = stat[stat.rindex(b")") + 2:].split()
    if rest[0] == b"Z":
        return None
    return int(rest[19])


_alive_cache: dict[tuple[int, int], tuple[bool, float]] = {}


def alive(pid: int, start_time: int, *, fresh: bool = False) -> bool:
    now = time.monotonic()
    key = (pid, start_time)
    cached = _alive_cache.get(key)
    if cached is not None and not fresh and now - cached[1] < _ALIVE_TTL_S:
        return cached[0]
    alive = process_start_time(pid) == start_time
    if len(_alive_cache) > 4096:
        _alive_cache.clear()
    _alive_cache[key] = (alive, now)
    return alive


def record_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{RECORD_SUFFIX}"


def group_path(directory: Path, group: str) -> Path:
    return directory / f"{group}{GROUP_SUFFIX}"


def read_record(path: Path) -> RecordStruct | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < ctypes.sizeof(RecordStruct):
        return None
    rec = RecordStruct.from_buffer_copy(data)
    return rec if rec.magic == RECORD_MAGIC else None


def to_info(rec: RecordStruct, path: Path, *, fresh: bool = False) -> InstanceInfo:
    return InstanceInfo(
        name=rec.name.decode(), group=rec.group.decode(), pid=rec.pid, start_time=rec.start_time,
        used_bytes=rec.used_bytes, reserved_bytes=rec.reserved_bytes, limit_bytes=rec.limit_bytes,
        virtual_bytes=rec.virtual_bytes, page_bytes=rec.page_bytes, used_pages=rec.used_pages,
        reserved_pages=rec.reserved_pages, created=rec.created,
        backend=rec.backend.decode(), pool_path=rec.pool_path.decode(),
        alive=alive(rec.pid, rec.start_time, fresh=fresh), path=str(path))


class FileLock:
    """flock on a file, plus a thread lock: flock is per open file, so threads sharing the fd would not exclude
    each other."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._thread_lock = threading.Lock()

    def __enter__(self) -> "FileLock":
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self) -> None:
        os.close(self._fd)


class Mapped:
    """A struct file mapped read-write; the struct's fields are live views of shared memory."""

    def __init__(self, fd: int, struct_type: type[ctypes.Structure]) -> None:
        self.mm = mmap.mmap(fd, ctypes.sizeof(struct_type))
        self.inode = os.fstat(fd).st_ino
        self.view = struct_type.from_buffer(self.mm)

    def close(self) -> None:
        del self.view
        self.mm.close()


def write_struct_atomically(path: Path, value: ctypes.Structure) -> Mapped:
    """Create `path` holding `value` in one step (tmp + rename) and return its mapping."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, bytes(value))
        mapped = Mapped(fd, type(value))
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return mapped


def open_group(directory: Path, group: str) -> Mapped:
    """Map the group's record, creating it uncapped if absent. Caller holds the create lock."""
    path = group_path(directory, group)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return write_struct_atomically(path, GroupStruct(GROUP_MAGIC, -1, time.time(), group.encode()))
    try:
        return Mapped(fd, GroupStruct)
    finally:
        os.close(fd)


def read_group_cap(directory: Path, group: str) -> int | None:
    try:
        data = group_path(directory, group).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < ctypes.sizeof(GroupStruct):
        return None
    g = GroupStruct.from_buffer_copy(data)
    return None if g.magic != GROUP_MAGIC or g.cap_bytes < 0 else g.cap_bytes


def read_instances(directory: Path, *, fresh: bool = True) -> list[InstanceInfo]:
    """Every readable record in `directory` (live and dead), sorted by group then name."""
    if not directory.is_dir():
        return []
    out = []
    for path in directory.glob(f"*{RECORD_SUFFIX}"):
        rec = read_record(path)
        if rec is not None:
            out.append(to_info(rec, path, fresh=fresh))
    return sorted(out, key=lambda i: (i.group, i.name))

"""The on-disk format of budget records and group caps, and reading them back as hostile input.

Each record is a fixed-size C struct in its own small file under the shm directory, mmapped by its owner. The owner
updates `reserved_bytes` on every page map/unmap, so the hot path must be a memory store, not a file rewrite; every
field is an aligned 8-byte integer written with one store, so a reader never sees a torn value. Records appear
atomically (written to a temporary file, then renamed), so readers never see half a record.

Any process that can write the directory can write these files, and a crash can leave anything behind, so a reader
trusts nothing: it opens without following symlinks, wants a regular file of exactly the struct's size, the magic,
names that are valid UTF-8 and match the file name, and byte counts inside 0..2^63-1. Anything else is reported as
an UnreadableRecord (and `kvctl cleanup` removes it once its writer is gone), never decoded.

Liveness: a record stores its pid and the process start time from /proc/PID/stat, so a reused pid is not mistaken
for the original owner. The same pair identifies the holder of a lease.
"""
from __future__ import annotations

import ctypes
import fcntl
import math
import mmap
import os
import stat
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from kvcached.processes import process_start_time
from kvcached.shm import OPEN_FLAGS, is_valid_name
from kvcached.units import MAX_BYTES

RECORD_SUFFIX = ".rec"
GROUP_SUFFIX = ".group"
LOCK_SUFFIX = ".lock"
POOL_SUFFIX = ".pool"
CREATE_LOCK = ".create.lock"
RECORD_MAGIC = b"KVCREC4"  # 4: floor, retained prefix cache, unmet demand; 3: a lease on the limit
GROUP_MAGIC = b"KVCGRP1"
NO_LEASE = -1
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
        # A lease lowers the limit while its holder lives and until it expires (a router's `kv` sleep): when the
        # holder dies, the limit comes back by itself. `lease_expires` is CLOCK_MONOTONIC seconds (one clock per
        # boot, shared by every process); it is written last when a lease is set and first when it is dropped.
        ("lease_limit_bytes", ctypes.c_int64),
        ("lease_expires", ctypes.c_double),
        ("lease_pid", ctypes.c_int64),
        ("lease_start_time", ctypes.c_int64),
        # What an idle engine holds, in two figures the owner publishes: its floor (the null block's page, warm
        # pages) and its retained prefix cache (pages only cached-but-free blocks keep), which it gives back when
        # anyone wants the memory.
        ("floor_bytes", ctypes.c_int64),
        ("retained_bytes", ctypes.c_int64),
        # Unmet demand: bytes this pool asked for and the group cap refused, and when (CLOCK_MONOTONIC). The
        # group's other members read it and give retained prefix cache back.
        ("wanted_bytes", ctypes.c_int64),
        ("wanted_at", ctypes.c_double),
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


RECORD_SIZE = ctypes.sizeof(RecordStruct)
GROUP_SIZE = ctypes.sizeof(GroupStruct)
_BYTE_FIELDS = ("used_bytes", "reserved_bytes", "limit_bytes", "virtual_bytes", "page_bytes", "floor_bytes",
                "retained_bytes", "wanted_bytes")
_COUNT_FIELDS = ("used_pages", "reserved_pages")


class UnreadableError(ValueError):
    """A file in the shm directory that is not a record (or group) this version can trust; the message says why."""


@dataclass(frozen=True)
class InstanceInfo:
    """A snapshot of one pool's record, as `kvctl list` and kvtop show it.

    `limit_bytes` is the limit set for the pool; `effective_limit_bytes` is what binds now (lower while a lease
    holds it down, e.g. a router's `kv` sleep)."""

    name: str
    group: str
    pid: int
    start_time: int
    used_bytes: int
    reserved_bytes: int
    limit_bytes: int
    effective_limit_bytes: int
    virtual_bytes: int
    page_bytes: int
    used_pages: int
    reserved_pages: int
    created: float
    backend: str
    pool_path: str
    alive: bool
    path: str
    lease_limit_bytes: int | None = None
    lease_holder_pid: int | None = None
    lease_expires_in_s: float | None = None
    floor_bytes: int = 0  # the idle floor: the null block's page and warm pages
    retained_bytes: int = 0  # the retained prefix cache: given back when anyone wants the memory

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class UnreadableRecord:
    """A `.rec` file that could not be trusted: garbage, truncated, another format, or a forged name."""

    name: str  # the file's stem, which is all that can be said of it
    path: str
    reason: str
    pid: int | None  # the writer's pid when the header's identity fields could be read
    alive: bool  # True while that writer still runs (the file is then left alone)

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


def check_bytes(value: object, what: str) -> int:
    """`value` as a byte count in 0..2^63-1, or ValueError naming `what` and the range (NaN, inf, floats, bools and
    out-of-range integers are refused: a record would wrap them)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{what} must be a whole number of bytes, got {value!r}")
    if not 0 <= value <= MAX_BYTES:
        raise ValueError(f"{what} {value} is outside 0..{MAX_BYTES} bytes (2^63-1): give a size such as 512M or 2G")
    return value


_alive_cache: dict[tuple[int, int], tuple[bool, float]] = {}


def alive(pid: int, start_time: int, *, fresh: bool = False) -> bool:
    """True while the process (pid, start_time) runs. Cached for half a second unless `fresh`."""
    now = time.monotonic()
    key = (pid, start_time)
    cached = _alive_cache.get(key)
    if cached is not None and not fresh and now - cached[1] < _ALIVE_TTL_S:
        return cached[0]
    is_alive = process_start_time(pid) == start_time
    if len(_alive_cache) > 4096:
        _alive_cache.clear()
    _alive_cache[key] = (is_alive, now)
    return is_alive


def this_process() -> tuple[int, int]:
    """(pid, start time) of the calling process: who owns a record or holds a lease."""
    start = process_start_time(os.getpid())
    if start is None:
        raise RuntimeError("cannot read /proc/self/stat: kvcached needs Linux /proc")
    return os.getpid(), start


def record_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{RECORD_SUFFIX}"


def group_path(directory: Path, group: str) -> Path:
    return directory / f"{group}{GROUP_SUFFIX}"


def lock_path(directory: Path, group: str) -> Path:
    return directory / f"{group}{LOCK_SUFFIX}"


def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """An fd on `path`, which must be a regular file reached without a symlink (UnreadableError otherwise)."""
    try:
        fd = os.open(path, flags | OPEN_FLAGS | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the last component is a symlink
            raise UnreadableError(f"{path.name} is a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnreadableError(f"{path.name} is not a regular file")
    return fd


def read_exact(path: Path, size: int) -> bytes:
    """The whole file, which must hold exactly `size` bytes."""
    fd = open_regular(path)
    try:
        data = os.pread(fd, size + 1, 0)
    finally:
        os.close(fd)
    if len(data) != size:
        raise UnreadableError(f"{path.name} holds {len(data)} bytes, not {size} (truncated or not a record)")
    return data


def _text(raw: bytes, field: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnreadableError(f"its {field} is not valid UTF-8") from None


def header_identity(data: bytes) -> tuple[int, int] | None:
    """(pid, start_time) from a record's header whatever its format version (every version keeps magic, version,
    pid and start_time first), or None when the bytes cannot hold them."""
    if len(data) < 32 or not data.startswith(b"KVCREC"):
        return None
    pid = int.from_bytes(data[16:24], "little", signed=True)
    start = int.from_bytes(data[24:32], "little", signed=True)
    return (pid, start) if pid > 0 and start >= 0 else None


def parse_record(data: bytes, path: Path) -> RecordStruct:
    """The record in `data` after every check a reader needs (UnreadableError says which one failed)."""
    rec = RecordStruct.from_buffer_copy(data)
    if rec.magic != RECORD_MAGIC:
        raise UnreadableError(f"unknown format {bytes(rec.magic)!r} (this kvcached writes {RECORD_MAGIC!r})")
    name = _text(rec.name, "name")
    _text(rec.group, "group")
    _text(rec.backend, "backend")
    _text(rec.pool_path, "pool path")
    if name != path.name[: -len(RECORD_SUFFIX)] or not is_valid_name(name):
        raise UnreadableError(f"its name {name!r} does not match the file {path.name}")
    if not is_valid_name(rec.group.decode()):
        raise UnreadableError(f"its group {rec.group.decode()!r} is not a valid group name")
    if rec.pid <= 0 or rec.start_time < 0:
        raise UnreadableError(f"its owner pid {rec.pid} is not a process id")
    for field in _BYTE_FIELDS + _COUNT_FIELDS:
        if getattr(rec, field) < 0:
            raise UnreadableError(f"its {field} is negative ({getattr(rec, field)})")
    if rec.lease_limit_bytes < NO_LEASE or not math.isfinite(rec.lease_expires) or not math.isfinite(rec.wanted_at):
        raise UnreadableError("its lease fields are out of range")
    return rec


def read_record(path: Path) -> RecordStruct:
    """The record at `path` (FileNotFoundError if gone, UnreadableError if it cannot be trusted)."""
    return parse_record(read_exact(path, RECORD_SIZE), path)


def lease_active(rec: RecordStruct, now: float | None = None) -> bool:
    """A lease binds while it has not expired and its holder still runs."""
    if rec.lease_limit_bytes == NO_LEASE:
        return False
    now = time.monotonic() if now is None else now
    return rec.lease_expires > now and alive(rec.lease_pid, rec.lease_start_time)


def effective_limit(rec: RecordStruct) -> int:
    """The limit that binds now: the pool's limit, or the lease's when one is active and lower."""
    if lease_active(rec):
        return min(rec.limit_bytes, rec.lease_limit_bytes)
    return rec.limit_bytes


def to_info(rec: RecordStruct, path: Path, *, fresh: bool = False) -> InstanceInfo:
    now = time.monotonic()
    leased = lease_active(rec, now)
    return InstanceInfo(
        name=rec.name.decode(), group=rec.group.decode(), pid=rec.pid, start_time=rec.start_time,
        used_bytes=rec.used_bytes, reserved_bytes=rec.reserved_bytes, limit_bytes=rec.limit_bytes,
        effective_limit_bytes=effective_limit(rec), virtual_bytes=rec.virtual_bytes, page_bytes=rec.page_bytes,
        used_pages=rec.used_pages, reserved_pages=rec.reserved_pages, created=rec.created,
        backend=rec.backend.decode(), pool_path=rec.pool_path.decode(),
        alive=alive(rec.pid, rec.start_time, fresh=fresh), path=str(path),
        lease_limit_bytes=rec.lease_limit_bytes if leased else None,
        lease_holder_pid=rec.lease_pid if leased else None,
        lease_expires_in_s=rec.lease_expires - now if leased else None,
        floor_bytes=rec.floor_bytes, retained_bytes=rec.retained_bytes)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        fd = open_regular(path)
    except (UnreadableError, OSError):
        return None
    try:
        return header_identity(os.pread(fd, 32, 0))
    finally:
        os.close(fd)


def scan_records(directory: Path, *, fresh: bool = True) -> tuple[list[InstanceInfo], list[UnreadableRecord]]:
    """Every record in `directory` (sorted by group, then name), and every `.rec` file that could not be trusted."""
    infos: list[InstanceInfo] = []
    bad: list[UnreadableRecord] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return [], []
    for entry in entries:
        if not entry.name.endswith(RECORD_SUFFIX) or entry.name.startswith("."):
            continue
        path = Path(entry.path)
        try:
            data = read_exact(path, RECORD_SIZE)
            infos.append(to_info(parse_record(data, path), path, fresh=fresh))
        except FileNotFoundError:
            continue  # removed while we looked
        except (UnreadableError, OSError) as exc:
            ident = _identity(path)
            bad.append(UnreadableRecord(
                name=entry.name[: -len(RECORD_SUFFIX)], path=str(path), reason=str(exc),
                pid=ident[0] if ident else None, alive=bool(ident) and alive(*ident, fresh=fresh)))
    infos.sort(key=lambda i: (i.group, i.name))
    return infos, bad


def read_instances(directory: Path, *, fresh: bool = True) -> list[InstanceInfo]:
    """Every trustworthy record in `directory` (live and dead), sorted by group then name."""
    return scan_records(directory, fresh=fresh)[0]


class FileLock:
    """flock on a file, plus a thread lock: flock is per open file, so threads sharing the fd would not exclude
    each other. The kernel drops flock when its holder dies, so a crash never wedges anyone."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        self._fd = os.open(path, flags | OPEN_FLAGS, 0o600)
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
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o600)
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
    """Map the group's record, creating it uncapped if absent or untrustworthy. Caller holds the create lock."""
    path = group_path(directory, group)
    try:
        read_group(path)
        fd = open_regular(path, os.O_RDWR)
    except (FileNotFoundError, UnreadableError):
        return write_struct_atomically(path, GroupStruct(GROUP_MAGIC, -1, time.time(), group.encode()))
    try:
        return Mapped(fd, GroupStruct)
    finally:
        os.close(fd)


def read_group(path: Path) -> GroupStruct:
    """The group record at `path` (FileNotFoundError if gone, UnreadableError if it cannot be trusted)."""
    return parse_group(read_exact(path, GROUP_SIZE), path)


def parse_group(data: bytes, path: Path) -> GroupStruct:
    if len(data) != GROUP_SIZE:
        raise UnreadableError(f"{path.name} holds {len(data)} bytes, not {GROUP_SIZE} (truncated or not a group)")
    g = GroupStruct.from_buffer_copy(data)
    if g.magic != GROUP_MAGIC:
        raise UnreadableError(f"{path.name}: unknown group format {bytes(g.magic)!r}")
    if g.cap_bytes < -1:
        raise UnreadableError(f"{path.name}: cap {g.cap_bytes} is out of range")
    return g


def read_group_cap(directory: Path, group: str) -> int | None:
    """The group's cap in bytes; None when it has none (or its file cannot be trusted: an uncapped group)."""
    try:
        g = read_group(group_path(directory, group))
    except (OSError, UnreadableError):
        return None
    return None if g.cap_bytes < 0 else g.cap_bytes


class GroupCapReader:
    """A group's cap, read through one open file descriptor: a single pread per read, no path walk, because every
    page map and unmap asks for it. The file is hostile input like any other (pread and checks, never a mapping).
    Admins write the cap in place, so a read sees a new cap at once; when the file itself is replaced (recreated
    after it could not be trusted, or removed with an unused group), its inode changes, which the reader notices
    within REVALIDATE_S and reopens."""

    REVALIDATE_S = 0.5

    def __init__(self, directory: Path, group: str) -> None:
        self._path = group_path(directory, group)
        self._fd: int | None = None
        self._inode: int | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()

    def cap(self) -> int | None:
        """The cap in bytes; None when the group has none (or no trustworthy file: an uncapped group)."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= self.REVALIDATE_S:
                self._revalidate(now)
            if self._fd is None:
                return None
            try:
                data = os.pread(self._fd, GROUP_SIZE + 1, 0)
            except OSError:
                return None
        try:
            g = parse_group(data, self._path)
        except UnreadableError:
            return None
        return None if g.cap_bytes < 0 else g.cap_bytes

    def _revalidate(self, now: float) -> None:
        self._checked = now
        try:
            inode = os.stat(self._path, follow_symlinks=False).st_ino
        except OSError:
            self._close_fd()
            return
        if self._fd is not None and inode == self._inode:
            return
        self._close_fd()
        try:
            fd = open_regular(self._path)
        except (OSError, UnreadableError):
            return
        self._fd, self._inode = fd, os.fstat(fd).st_ino

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._inode = None

    def close(self) -> None:
        with self._lock:
            self._close_fd()

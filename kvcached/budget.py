"""Memory budgets shared between processes: one record per KV pool, one optional cap per group.

Storage: each record is a fixed-size C struct in its own small file under the shm directory, mmapped by its
owner. The owner updates `reserved_bytes` on every page map/unmap, so the hot path must be a memory store,
not a file rewrite; every field is an aligned 8-byte integer written with one store, so a reader never sees
a torn value, and the one field other processes write (`limit_bytes`, from `kvctl`) has no other writer.
Records appear atomically (written to a temporary file, then renamed), so readers never see half a record.

Concurrency: reservations take `fcntl.flock` on a per-group lock file. flock works across processes, is
released by the kernel when the holder dies (so a crashed engine never wedges its group), and needs no
daemon. Under the lock a reservation checks `sum(reserved of live members) + request <= cap` and bumps its
own `reserved_bytes` before the memory is mapped; releases only lower values and so need no lock. Hence the
sum of reserved bytes never exceeds the cap at any instant a reader holding the same lock can observe.

Liveness: a record stores its pid and the process start time from /proc/PID/stat, so a reused pid is
not mistaken for the original owner.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

SHM_DIR_ENV = "KVCACHED_SHM_DIR"
GROUP_ENV = "KVCACHED_IPC_NAME"
DEFAULT_SHM_DIR = "/dev/shm/kvcached"

RECORD_SUFFIX = ".rec"
GROUP_SUFFIX = ".group"
LOCK_SUFFIX = ".lock"
_CREATE_LOCK = ".create.lock"
_RECORD_MAGIC = b"KVCREC1"
_GROUP_MAGIC = b"KVCGRP1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_ALIVE_TTL_S = 0.5


class _Record(ctypes.Structure):
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
        ("heartbeat", ctypes.c_double),
        ("created", ctypes.c_double),
        ("name", ctypes.c_char * 128),
        ("group", ctypes.c_char * 128),
        ("backend", ctypes.c_char * 16),
        ("pool_path", ctypes.c_char * 512),
    ]


class _Group(ctypes.Structure):
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
    heartbeat: float
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


def shm_dir() -> Path:
    """The records directory: $KVCACHED_SHM_DIR, else /dev/shm/kvcached (read on every call so tests can move it)."""
    return Path(os.environ.get(SHM_DIR_ENV) or DEFAULT_SHM_DIR)


def _ensure_dir(directory: Path) -> Path:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory


def default_group() -> str:
    """$KVCACHED_IPC_NAME, else a name no other process uses (so an unnamed pool shares its budget with nobody)."""
    env = os.environ.get(GROUP_ENV)
    if env:
        return sanitize_name(env)
    return f"kvcached-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def sanitize_name(text: str) -> str:
    """Map an arbitrary label (e.g. a model name) to a safe file-name stem."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip("._-")[:100]
    return cleaned or "kvcached"


def _check_name(name: str, what: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' (at most 100 characters)")


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


def _alive(pid: int, start_time: int, *, fresh: bool = False) -> bool:
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


def _record_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{RECORD_SUFFIX}"


def _group_path(directory: Path, group: str) -> Path:
    return directory / f"{group}{GROUP_SUFFIX}"


def _read_record(path: Path) -> _Record | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < ctypes.sizeof(_Record):
        return None
    rec = _Record.from_buffer_copy(data)
    return rec if rec.magic == _RECORD_MAGIC else None


def _info(rec: _Record, path: Path, *, fresh: bool = False) -> InstanceInfo:
    return InstanceInfo(
        name=rec.name.decode(), group=rec.group.decode(), pid=rec.pid, start_time=rec.start_time,
        used_bytes=rec.used_bytes, reserved_bytes=rec.reserved_bytes, limit_bytes=rec.limit_bytes,
        virtual_bytes=rec.virtual_bytes, page_bytes=rec.page_bytes, used_pages=rec.used_pages,
        reserved_pages=rec.reserved_pages, heartbeat=rec.heartbeat, created=rec.created,
        backend=rec.backend.decode(), pool_path=rec.pool_path.decode(),
        alive=_alive(rec.pid, rec.start_time, fresh=fresh), path=str(path))


class _FileLock:
    """flock on a file, plus a thread lock: flock is per open file, so threads sharing the fd would not exclude each other."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._thread_lock = threading.Lock()

    def __enter__(self) -> "_FileLock":
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


class _Mapped:
    """A struct file mapped read-write; the struct's fields are live views of shared memory."""

    def __init__(self, fd: int, struct_type: type[ctypes.Structure]) -> None:
        self.mm = mmap.mmap(fd, ctypes.sizeof(struct_type))
        self.inode = os.fstat(fd).st_ino
        self.view = struct_type.from_buffer(self.mm)

    def close(self) -> None:
        del self.view
        self.mm.close()


def _write_struct_atomically(path: Path, value: ctypes.Structure) -> _Mapped:
    """Create `path` holding `value` in one step (tmp + rename) and return its mapping."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, bytes(value))
        mapped = _Mapped(fd, type(value))
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return mapped


def _open_group(directory: Path, group: str) -> _Mapped:
    """Map the group's record, creating it uncapped if absent. Caller holds the create lock."""
    path = _group_path(directory, group)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return _write_struct_atomically(path, _Group(_GROUP_MAGIC, -1, time.time(), group.encode()))
    try:
        return _Mapped(fd, _Group)
    finally:
        os.close(fd)


class BudgetRecord:
    """This process's record for one pool: reservations against its limit and its group's cap.

    Thread-safe. Several pools in one process each get their own record (a taken name gets a suffix).
    """

    def __init__(self, directory: Path, path: Path, record: _Mapped, group: _Mapped, lock: _FileLock) -> None:
        self._dir = directory
        self._path = path
        self._record = record
        self._rec: _Record = record.view  # type: ignore[assignment]
        self._groupmap = group
        self._group: _Group = group.view  # type: ignore[assignment]
        self._group_lock = lock
        self._lock = threading.Lock()
        self._members: dict[str, tuple[int, _Mapped]] = {}
        self._closed = False
        self.name = self._rec.name.decode()
        self.group = self._rec.group.decode()

    @classmethod
    def create(cls, virtual_bytes: int, *, name: str | None = None, group: str | None = None,
               limit_bytes: int | None = None, page_bytes: int = 0, pool_path: str | os.PathLike | None = None,
               backend: str = "host") -> "BudgetRecord":
        """Publish a record for a pool of `virtual_bytes`; limit defaults to the whole pool."""
        group = sanitize_name(group) if group else default_group()
        _check_name(group, "group name")
        base = sanitize_name(name) if name else f"{group}-{os.getpid()}"
        _check_name(base, "instance name")
        if virtual_bytes < 0 or (limit_bytes is not None and limit_bytes < 0):
            raise ValueError("virtual_bytes and limit_bytes cannot be negative")
        directory = _ensure_dir(shm_dir())
        start = process_start_time(os.getpid())
        assert start is not None, "cannot read /proc/self/stat: kvcached needs Linux /proc"
        lock = _FileLock(directory / _CREATE_LOCK)
        with lock:
            chosen = base
            suffix = 1
            while True:
                existing = _read_record(_record_path(directory, chosen))
                if existing is None or not _alive(existing.pid, existing.start_time, fresh=True):
                    break
                suffix += 1
                chosen = f"{base}-{suffix}"
            now = time.time()
            rec = _Record(
                magic=_RECORD_MAGIC, version=1, pid=os.getpid(), start_time=start, used_bytes=0,
                reserved_bytes=0, limit_bytes=virtual_bytes if limit_bytes is None else limit_bytes,
                virtual_bytes=virtual_bytes, page_bytes=page_bytes, used_pages=0, reserved_pages=0,
                heartbeat=now, created=now, name=chosen.encode(), group=group.encode(),
                backend=backend.encode()[:15], pool_path=os.fsencode(pool_path or b"")[:511])
            path = _record_path(directory, chosen)
            record = _write_struct_atomically(path, rec)
            groupmap = _open_group(directory, group)
        lock.close()
        return cls(directory, path, record, groupmap, _FileLock(directory / f"{group}{LOCK_SUFFIX}"))

    # Reading the live values ------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    @property
    def limit_bytes(self) -> int:
        return self._rec.limit_bytes

    @property
    def reserved_bytes(self) -> int:
        return self._rec.reserved_bytes

    @property
    def used_bytes(self) -> int:
        return self._rec.used_bytes

    @property
    def virtual_bytes(self) -> int:
        return self._rec.virtual_bytes

    @property
    def group_cap(self) -> int | None:
        cap = self._group.cap_bytes
        return None if cap < 0 else cap

    def info(self) -> InstanceInfo:
        return _info(_Record.from_buffer_copy(bytes(self._record.mm)), self._path)

    # Reservations -----------------------------------------------------------------------------------------
    def try_reserve(self, num_bytes: int, pages: int = 0) -> bool:
        """Count `num_bytes` as reserved if the limit and the group cap allow; call before mapping memory."""
        if num_bytes < 0:
            raise ValueError("try_reserve needs a non-negative byte count; use release() to give memory back")
        with self._lock, self._group_lock:
            rec = self._rec
            if rec.reserved_bytes + num_bytes > rec.limit_bytes:
                return False
            cap = self.group_cap
            if cap is not None and self._others_reserved() + rec.reserved_bytes + num_bytes > cap:
                return False
            rec.reserved_bytes += num_bytes
            rec.reserved_pages += pages
            rec.heartbeat = time.time()
        return True

    def release(self, num_bytes: int, pages: int = 0) -> None:
        """Give back reserved bytes after unmapping (or after a failed map)."""
        with self._lock:
            rec = self._rec
            rec.reserved_bytes = max(0, rec.reserved_bytes - num_bytes)
            rec.reserved_pages = max(0, rec.reserved_pages - pages)
            rec.heartbeat = time.time()

    def set_used(self, num_bytes: int, pages: int) -> None:
        """Publish how much of the reserved memory holds live blocks (the rest is warm or awaiting reclaim)."""
        with self._lock:
            self._rec.used_bytes = num_bytes
            self._rec.used_pages = pages
            self._rec.heartbeat = time.time()

    def set_limit(self, num_bytes: int) -> None:
        if num_bytes < 0:
            raise ValueError(f"limit {num_bytes} is negative: give a size of 0 or more")
        self._rec.limit_bytes = num_bytes

    def heartbeat(self) -> None:
        self._rec.heartbeat = time.time()

    def headroom(self) -> int:
        """Bytes that may still be reserved now under the limit and the group cap."""
        with self._lock, self._group_lock:
            rec = self._rec
            room = rec.limit_bytes - rec.reserved_bytes
            cap = self.group_cap
            if cap is not None:
                room = min(room, cap - self._others_reserved() - rec.reserved_bytes)
        return max(room, 0)

    def over_budget(self) -> int:
        """Bytes this pool should give back: over its own limit, or its share of its group being over the cap."""
        rec = self._rec
        over = rec.reserved_bytes - rec.limit_bytes
        cap = self.group_cap
        if cap is not None:
            with self._lock, self._group_lock:
                excess = self._others_reserved() + rec.reserved_bytes - cap
            over = max(over, min(excess, rec.reserved_bytes))
        return max(over, 0)

    def _others_reserved(self) -> int:
        """Sum of reserved bytes of the other live members of this group. Caller holds the group lock."""
        total = 0
        seen: set[str] = set()
        with os.scandir(self._dir) as entries:
            for entry in entries:
                if not entry.name.endswith(RECORD_SUFFIX) or entry.path == str(self._path):
                    continue
                seen.add(entry.name)
                cached = self._members.get(entry.name)
                if cached is None or cached[0] != entry.inode():
                    if cached is not None:
                        cached[1].close()
                    try:
                        fd = os.open(entry.path, os.O_RDWR | os.O_CLOEXEC)
                    except FileNotFoundError:
                        continue
                    try:
                        mapped = _Mapped(fd, _Record)
                        cached = (mapped.inode, mapped)
                    except (ValueError, OSError):
                        continue
                    finally:
                        os.close(fd)
                    self._members[entry.name] = cached
                rec: _Record = cached[1].view  # type: ignore[assignment]
                if rec.magic != _RECORD_MAGIC or rec.group.decode() != self.group:
                    continue
                if _alive(rec.pid, rec.start_time):
                    total += rec.reserved_bytes
        for gone in set(self._members) - seen:
            self._members.pop(gone)[1].close()
        return total

    def close(self) -> None:
        """Remove this record (the pool is gone, its memory released)."""
        if self._closed:
            return
        self._closed = True
        try:
            if os.stat(self._path).st_ino == self._record.inode:
                self._path.unlink()
        except (FileNotFoundError, ValueError, OSError):
            pass
        for _, mapped in self._members.values():
            mapped.close()
        self._members.clear()
        self._forget_group_if_unused()
        self._rec = _Record.from_buffer_copy(bytes(self._record.mm))  # keep reads valid after close
        self._record.close()
        self._group = _Group.from_buffer_copy(bytes(self._groupmap.mm))
        self._groupmap.close()
        self._group_lock.close()

    def _forget_group_if_unused(self) -> None:
        """Remove an uncapped group's files once its last member leaves, so unnamed groups do not pile up.

        Done under the create lock, which every new member holds while publishing its record, so a member
        joining concurrently is either seen here (files kept) or creates fresh files after.
        """
        if self.group_cap is not None:
            return
        lock = _FileLock(self._dir / _CREATE_LOCK)
        try:
            with lock:
                if not any(i.group == self.group for i in list_instances(fresh=False)):
                    _group_path(self._dir, self.group).unlink(missing_ok=True)
                    (self._dir / f"{self.group}{LOCK_SUFFIX}").unlink(missing_ok=True)
        finally:
            lock.close()

    def __enter__(self) -> "BudgetRecord":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The live-reading API (kvctl, kvtop, kvlab) ------------------------------------------------------------------

def list_instances(group: str | None = None, *, fresh: bool = True) -> list[InstanceInfo]:
    """All records (live and dead), sorted by group then name."""
    directory = shm_dir()
    if not directory.is_dir():
        return []
    out = []
    for path in directory.glob(f"*{RECORD_SUFFIX}"):
        rec = _read_record(path)
        if rec is None:
            continue
        info = _info(rec, path, fresh=fresh)
        if group is None or info.group == group:
            out.append(info)
    return sorted(out, key=lambda i: (i.group, i.name))


def _read_group_cap(directory: Path, group: str) -> int | None:
    try:
        data = _group_path(directory, group).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < ctypes.sizeof(_Group):
        return None
    g = _Group.from_buffer_copy(data)
    return None if g.magic != _GROUP_MAGIC or g.cap_bytes < 0 else g.cap_bytes


def list_groups() -> list[GroupInfo]:
    """Every group with a record or a group file, with its cap and the totals of its live members."""
    directory = shm_dir()
    if not directory.is_dir():
        return []
    instances = [i for i in list_instances() if i.alive]
    names = {i.group for i in instances}
    names |= {p.name[: -len(GROUP_SUFFIX)] for p in directory.glob(f"*{GROUP_SUFFIX}")}
    groups = []
    for name in sorted(names):
        members = [i for i in instances if i.group == name]
        groups.append(GroupInfo(
            name=name, cap_bytes=_read_group_cap(directory, name), members=len(members),
            used_bytes=sum(i.used_bytes for i in members), reserved_bytes=sum(i.reserved_bytes for i in members),
            limit_bytes=sum(i.limit_bytes for i in members)))
    return groups


def group_cap(group: str) -> int | None:
    """The group's cap in bytes, or None when it has none."""
    return _read_group_cap(shm_dir(), sanitize_name(group))


def group_reserved(group: str) -> int:
    """Sum of reserved bytes of the group's live members, read under the group lock (a consistent snapshot)."""
    directory = shm_dir()
    lock = _FileLock(_ensure_dir(directory) / f"{group}{LOCK_SUFFIX}")
    try:
        with lock:
            return sum(i.reserved_bytes for i in list_instances(group, fresh=False) if i.alive)
    finally:
        lock.close()


def find_instance(name: str) -> InstanceInfo:
    """The record named `name`; KeyError with the known names otherwise."""
    for info in list_instances():
        if info.name == name:
            return info
    known = ", ".join(i.name for i in list_instances()) or "none"
    raise KeyError(f"no kvcached instance named {name!r} (known: {known}); `kvctl list` shows them")


def set_limit(name: str, num_bytes: int) -> InstanceInfo:
    """Set a pool's limit. A lower limit makes its allocator give back idle pages and refuse growth."""
    if num_bytes < 0:
        raise ValueError(f"limit {num_bytes} is negative: give a size of 0 or more")
    info = find_instance(name)
    fd = os.open(info.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        mapped = _Mapped(fd, _Record)
    finally:
        os.close(fd)
    try:
        mapped.view.limit_bytes = num_bytes  # type: ignore[attr-defined]
    finally:
        mapped.close()
    return find_instance(name)


def set_limit_percent(name: str, percent: float) -> InstanceInfo:
    """Set a pool's limit to `percent` of its virtual (whole-pool) size."""
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"percentage {percent} is outside 0..100")
    info = find_instance(name)
    return set_limit(name, int(info.virtual_bytes * percent / 100.0))


def set_group_limit(group: str, num_bytes: int | None, *, create: bool = False) -> GroupInfo:
    """Cap the sum of reserved bytes of a group (None removes the cap).

    An unknown group is an error (a typo would otherwise cap nothing) unless `create` is set, which lets
    a cap be placed before the engines start.
    """
    if num_bytes is not None and num_bytes < 0:
        raise ValueError(f"group limit {num_bytes} is negative: give a size of 0 or more, or `none`")
    _check_name(group, "group name")
    directory = _ensure_dir(shm_dir())
    known = {i.group for i in list_instances()} | {
        p.name[: -len(GROUP_SUFFIX)] for p in directory.glob(f"*{GROUP_SUFFIX}")}
    if group not in known and not create:
        raise KeyError(f"no kvcached group named {group!r} (known: {', '.join(sorted(known)) or 'none'}); "
                       "pass --create to set a cap before the engines start")
    lock = _FileLock(directory / _CREATE_LOCK)
    with lock:
        mapped = _open_group(directory, group)
    lock.close()
    try:
        mapped.view.cap_bytes = -1 if num_bytes is None else num_bytes  # type: ignore[attr-defined]
        mapped.view.updated = time.time()  # type: ignore[attr-defined]
    finally:
        mapped.close()
    return next(g for g in list_groups() if g.name == group)


def cleanup(prefix: str | None = None) -> list[str]:
    """Remove records of dead processes (only those whose name starts with `prefix`, when given) and the pool
    files they name; returns what was removed."""
    directory = shm_dir()
    if not directory.is_dir():
        return []
    removed: list[str] = []
    lock = _FileLock(directory / _CREATE_LOCK)
    with lock:
        for info in list_instances():
            if info.alive or (prefix is not None and not info.name.startswith(prefix)):
                continue
            if info.pool_path:
                pool = Path(info.pool_path)
                try:
                    pool.unlink()
                    removed.append(str(pool))
                except FileNotFoundError:
                    pass
                except IsADirectoryError:
                    pass
            Path(info.path).unlink(missing_ok=True)
            removed.append(info.path)
        live_groups = {i.group for i in list_instances()}
        for path in directory.glob(f"*{GROUP_SUFFIX}"):
            group = path.name[: -len(GROUP_SUFFIX)]
            if group not in live_groups and _read_group_cap(directory, group) is None:
                path.unlink(missing_ok=True)
                (directory / f"{group}{LOCK_SUFFIX}").unlink(missing_ok=True)
                removed.append(str(path))
        for tmp in directory.glob(".*.tmp"):
            pid = tmp.name.split(".")[-3] if tmp.name.count(".") >= 4 else ""
            if pid.isdigit() and process_start_time(int(pid)) is None:
                tmp.unlink(missing_ok=True)
    lock.close()
    return removed


__all__ = [
    "BudgetRecord", "InstanceInfo", "GroupInfo", "shm_dir", "default_group", "sanitize_name", "list_instances",
    "list_groups", "group_reserved", "find_instance", "set_limit", "set_limit_percent", "set_group_limit",
    "cleanup", "process_start_time", "SHM_DIR_ENV", "GROUP_ENV",
]

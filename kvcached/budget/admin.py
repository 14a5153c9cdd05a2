"""The admin side of the budget: the ONE module through which any record or group cap changes.

kvctl, kvtop, kvlab, the router and an engine's own resize all change records here, each change validated
(0..2^63-1 bytes) and made under the record's lock (flock on the record file), so concurrent changes from
several processes serialize and every value in a record is one somebody wrote. Instances are found by exact
name, never by prefix.

A lease (`lease_limit`) lowers a pool's limit while its holder lives and until it expires: a router that puts an
engine to sleep and then dies gives the engine its memory back when the lease runs out, with nothing to restore.

Reaping (`reap`, run when a kvcached process starts in the directory and by kvctl and kvtop) removes what dead
processes left: their records, the pool files named after them, memberless uncapped groups, half-written
temporary files and records nobody can read. It works under the create lock, which every new record is published
under, and judges liveness by pid and start time, so a process that is still starting is never reaped.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import Iterator

from kvcached.budget import stores
from kvcached.budget.records import (
    CREATE_LOCK,
    GROUP_SUFFIX,
    NO_LEASE,
    POOL_SUFFIX,
    RECORD_SIZE,
    FileLock,
    GroupInfo,
    InstanceInfo,
    Mapped,
    RecordStruct,
    UnreadableError,
    UnreadableRecord,
    check_bytes,
    group_path,
    lease_active,
    lock_path,
    open_group,
    open_regular,
    parse_record,
    process_start_time,
    read_exact,
    read_group,
    read_group_cap,
    record_path,
    scan_records,
    this_process,
    to_info,
)
from kvcached.shm import check_name, checked_dir, ensure_dir

DEFAULT_LEASE_S = 30.0


# ---- reading ---------------------------------------------------------------------------------------------

def _directory() -> Path | None:
    return checked_dir(create=False)


def list_instances(group: str | None = None, *, fresh: bool = True) -> list[InstanceInfo]:
    """Every trustworthy record (live and dead), sorted by group then name; `kvctl list` shows the others too."""
    directory = _directory()
    if directory is None:
        return []
    infos, _ = scan_records(directory, fresh=fresh)
    return [i for i in infos if group is None or i.group == group]


def list_unreadable() -> list[UnreadableRecord]:
    """`.rec` files that are not records this version can trust (garbage, truncated, forged, another format)."""
    directory = _directory()
    return [] if directory is None else scan_records(directory)[1]


def list_groups() -> list[GroupInfo]:
    """Every group with a record or a group file, with its cap and the totals of its live members."""
    directory = _directory()
    if directory is None:
        return []
    instances = [i for i in scan_records(directory)[0] if i.alive]
    prefix_stores = [s for s in stores.list_stores() if s.exists]
    names = {i.group for i in instances} | {s.group for s in prefix_stores} | _group_file_names(directory)
    groups = []
    for name in sorted(names):
        members = [i for i in instances if i.group == name]
        held_by_stores = sum(s.used_bytes for s in prefix_stores if s.group == name)
        groups.append(GroupInfo(
            name=name, cap_bytes=read_group_cap(directory, name), members=len(members),
            used_bytes=sum(i.used_bytes for i in members),
            reserved_bytes=sum(i.reserved_bytes for i in members) + held_by_stores,
            limit_bytes=sum(i.effective_limit_bytes for i in members)))
    return groups


def _group_file_names(directory: Path) -> set[str]:
    return {p.name[: -len(GROUP_SUFFIX)] for p in directory.glob(f"*{GROUP_SUFFIX}") if not p.name.startswith(".")}


def group_cap(group: str) -> int | None:
    """The group's cap in bytes, or None when it has none."""
    directory = _directory()
    return None if directory is None else read_group_cap(directory, group)


def group_reserved(group: str) -> int:
    """What the group's cap counts: reserved bytes of its live members and what its prefix stores hold, read under
    the group lock (a consistent snapshot)."""
    check_name(group, "group name")
    directory = ensure_dir()
    lock = FileLock(lock_path(directory, group))
    try:
        with lock:
            members = sum(i.reserved_bytes for i in scan_records(directory, fresh=False)[0]
                          if i.alive and i.group == group)
            return members + stores.store_bytes_of_group(directory, group)
    finally:
        lock.close()


def find_instance(name: str) -> InstanceInfo:
    """The record named exactly `name`; KeyError naming the known ones otherwise."""
    directory = _directory()
    if directory is not None and isinstance(name, str) and _valid(name):
        path = record_path(directory, name)
        try:
            return to_info(parse_record(read_exact(path, RECORD_SIZE), path), path)
        except FileNotFoundError:
            pass
        except UnreadableError as exc:
            raise KeyError(f"the kvcached record {name!r} cannot be read ({exc}): `kvctl cleanup` removes it "
                           "once its writer is gone") from None
    known = ", ".join(i.name for i in list_instances()) or "none"
    raise KeyError(f"no kvcached instance named {name!r} (known: {known}); `kvctl list` shows them")


def _valid(name: str) -> bool:
    try:
        check_name(name, "instance name")
    except ValueError:
        return False
    return True


# ---- changing one record, under its lock --------------------------------------------------------------------

class _RecordEdit:
    """The fields of a locked record, for one read-modify-write. Stores go straight to the shared mapping (each an
    aligned 8-byte store, so readers never see half a value); the edit holds no reference after it ends."""

    def __init__(self, mapped: Mapped) -> None:
        object.__setattr__(self, "_mapped", mapped)

    def __getattr__(self, name: str) -> object:
        return getattr(self._mapped.view, name)

    def __setattr__(self, name: str, value: object) -> None:
        setattr(self._mapped.view, name, value)


@contextlib.contextmanager
def _locked_record(path: Path, owner: tuple[int, int] | None = None) -> Iterator[RecordStruct]:
    """The record at `path`, mapped and locked (flock on the record file) for a read-modify-write.

    Checked like any read first (so a forged file is never mapped); `owner`, when given, must match."""
    fd = open_regular(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        parse_record(_read_fd(fd, path), path)
        mapped = Mapped(fd, RecordStruct)
        try:
            rec = _RecordEdit(mapped)
            if owner is not None and (rec.pid, rec.start_time) != owner:
                raise KeyError(f"{path.name} now belongs to another process")
            yield rec  # type: ignore[misc]
        finally:
            mapped.close()
    finally:
        os.close(fd)  # closing drops the flock


def _read_fd(fd: int, path: Path) -> bytes:
    data = os.pread(fd, RECORD_SIZE + 1, 0)
    if len(data) != RECORD_SIZE:
        raise UnreadableError(f"{path.name} holds {len(data)} bytes, not {RECORD_SIZE}")
    return data


def write_limit(path: Path, num_bytes: int, *, owner: tuple[int, int] | None = None) -> None:
    """Set the limit of the record at `path` (an owner's own resize comes here too)."""
    num_bytes = check_bytes(num_bytes, "limit")
    with _locked_record(path, owner) as rec:
        rec.limit_bytes = num_bytes


def _path_of(name: str) -> Path:
    info = find_instance(name)  # exact name, readable record, else KeyError naming the known ones
    return Path(info.path)


def set_limit(name: str, num_bytes: int) -> InstanceInfo:
    """Set a pool's limit. A lower limit makes its allocator give back idle pages and refuse growth."""
    num_bytes = check_bytes(num_bytes, "limit")
    write_limit(_path_of(name), num_bytes)
    return find_instance(name)


def set_limit_percent(name: str, percent: float) -> InstanceInfo:
    """Set a pool's limit to `percent` of its virtual (whole-pool) size."""
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0.0 <= percent <= 100.0:
        raise ValueError(f"percentage {percent!r} is outside 0..100")
    path = _path_of(name)
    with _locked_record(path) as rec:
        rec.limit_bytes = int(rec.virtual_bytes * percent / 100.0)
    return find_instance(name)


# ---- leases -------------------------------------------------------------------------------------------------

class LeaseLost(RuntimeError):
    """The lease was taken over, or its record is gone (the engine restarted): the limit is no longer held."""


class Lease:
    """A lowered limit held by this process; `renew()` keeps it, `release()` (or the holder's death, or the lease
    running out) gives the pool its own limit back. Nothing is saved or restored."""

    def __init__(self, name: str, path: Path, limit_bytes: int, ttl_s: float, holder: tuple[int, int]) -> None:
        self.name = name
        self.path = path
        self.limit_bytes = limit_bytes
        self.ttl_s = ttl_s
        self.holder = holder
        self.released = False

    def renew(self) -> None:
        with _locked_record(self.path) as rec:
            if (rec.lease_pid, rec.lease_start_time) != self.holder or rec.lease_limit_bytes == NO_LEASE:
                raise LeaseLost(f"the lease on {self.name!r} is no longer held by this process")
            rec.lease_expires = time.monotonic() + self.ttl_s

    def release(self) -> None:
        """Drop the lease (idempotent; a record that is gone has no lease to drop)."""
        if self.released:
            return
        self.released = True
        try:
            with _locked_record(self.path) as rec:
                if (rec.lease_pid, rec.lease_start_time) == self.holder:
                    rec.lease_expires = 0.0  # first: a reader that sees the old limit sees an expired lease
                    rec.lease_limit_bytes = NO_LEASE
                    rec.lease_pid = rec.lease_start_time = 0
        except (FileNotFoundError, UnreadableError):
            pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lease_limit(name: str, num_bytes: int, ttl_s: float = DEFAULT_LEASE_S) -> Lease:
    """Hold pool `name`'s limit at `num_bytes` (0: give everything back) for `ttl_s` seconds at a time.

    Another live holder's lease is an error; an expired one, or one whose holder died, is taken over."""
    num_bytes = check_bytes(num_bytes, "lease limit")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not 0 < ttl_s < 86400 * 365:
        raise ValueError(f"lease duration {ttl_s!r} must be a number of seconds > 0")
    holder = this_process()
    path = _path_of(name)
    with _locked_record(path) as rec:
        if lease_active(rec) and (rec.lease_pid, rec.lease_start_time) != holder:
            raise RuntimeError(f"{name!r} is already held at {rec.lease_limit_bytes} bytes by pid {rec.lease_pid}: "
                               "wait for that lease to end (`kvctl list` shows it)")
        rec.lease_limit_bytes = num_bytes
        rec.lease_pid, rec.lease_start_time = holder
        rec.lease_expires = time.monotonic() + ttl_s  # last: the lease starts binding once it is complete
    return Lease(name, path, num_bytes, float(ttl_s), holder)


# ---- group caps -----------------------------------------------------------------------------------------------

def set_group_limit(group: str, num_bytes: int | None, *, create: bool = False) -> GroupInfo:
    """Cap the sum of reserved bytes of a group (None removes the cap).

    An unknown group is an error (a typo would otherwise cap nothing) unless `create` is set, which lets a cap
    be placed before the engines start."""
    if num_bytes is not None:
        num_bytes = check_bytes(num_bytes, "group limit")
    check_name(group, "group name")
    directory = ensure_dir()
    known = {i.group for i in list_instances()} | _group_file_names(directory)
    if group not in known and not create:
        raise KeyError(f"no kvcached group named {group!r} (known: {', '.join(sorted(known)) or 'none'}); "
                       "pass --create to set a cap before the engines start")
    create_lock = FileLock(directory / CREATE_LOCK)
    try:
        with create_lock:
            mapped = open_group(directory, group)
    finally:
        create_lock.close()
    group_lock = FileLock(lock_path(directory, group))
    try:
        with group_lock:
            mapped.view.cap_bytes = -1 if num_bytes is None else num_bytes  # type: ignore[attr-defined]
            mapped.view.updated = time.time()  # type: ignore[attr-defined]
    finally:
        mapped.close()
        group_lock.close()
    return next(g for g in list_groups() if g.name == group)


# ---- reaping ---------------------------------------------------------------------------------------------------

def reap() -> list[str]:
    """Remove what dead processes left in the shm directory; returns the paths removed."""
    directory = _directory()
    if directory is None:
        return []
    create_lock = FileLock(directory / CREATE_LOCK)
    try:
        with create_lock:
            return reap_locked(directory)
    finally:
        create_lock.close()


def cleanup() -> list[str]:
    """`kvctl cleanup`: the same as reap(), on demand."""
    return reap()


def reap_locked(directory: Path) -> list[str]:
    """reap() for a caller that holds the create lock."""
    from kvcached.prefix_files import dead_writers_tmp

    removed: list[str] = []
    infos, unreadable = scan_records(directory, fresh=True)
    for info in infos:
        if not info.alive:
            removed += _remove_record(directory, info.name)
    for bad in unreadable:
        if not bad.alive:
            removed += _remove_record(directory, bad.name)
    live = {i.group for i in infos if i.alive}
    for group in sorted(_group_file_names(directory)):
        if group not in live:
            removed += forget_group_if_unused_locked(directory, group, live_groups=live)
    for tmp in directory.glob(".*.tmp"):
        parts = tmp.name.split(".")
        pid = parts[-3] if len(parts) >= 5 else ""
        if pid.isdigit() and process_start_time(int(pid)) is None and _is_own_regular_file(tmp):
            tmp.unlink(missing_ok=True)
            removed.append(str(tmp))
    removed += stores.reap_stores_locked(directory)
    for store in stores.list_stores():
        for tmp in dead_writers_tmp(Path(store.root)):  # chunks a dead writer left half-written
            if _is_own_regular_file(tmp):
                tmp.unlink(missing_ok=True)
                removed.append(str(tmp))
    return removed


def forget_group_if_unused_locked(directory: Path, group: str, live_groups: set[str] | None = None) -> list[str]:
    """Remove an uncapped group's files when no live member is left. Caller holds the create lock."""
    if live_groups is None:
        live_groups = {i.group for i in scan_records(directory, fresh=True)[0] if i.alive}
    if group in live_groups:
        return []
    path = group_path(directory, group)
    try:
        capped = read_group(path).cap_bytes >= 0
    except FileNotFoundError:
        capped = False
    except (UnreadableError, OSError):
        capped = False  # a group file nobody can read caps nothing
    if capped:
        return []  # a cap may be set before its engines start: it stays until someone removes it
    removed = []
    for p in (path, lock_path(directory, group)):
        if _is_own_regular_file(p):
            p.unlink(missing_ok=True)
            removed.append(str(p))
    return removed


def _remove_record(directory: Path, name: str) -> list[str]:
    """A dead record, and the pool files its owner created: `NAME.pool` and `NAME.rankN.pool` in the shm directory
    only (never a path the record names: a forged record could name any file)."""
    removed = []
    rec = record_path(directory, name)
    pools = [directory / f"{name}{POOL_SUFFIX}", *directory.glob(f"{name}.rank*{POOL_SUFFIX}")]
    for p in [*pools, rec]:
        if p.parent == directory and _is_own_regular_file(p):
            p.unlink(missing_ok=True)
            removed.append(str(p))
    return removed


def _is_own_regular_file(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


__all__ = [
    "DEFAULT_LEASE_S", "Lease", "LeaseLost", "cleanup", "find_instance", "forget_group_if_unused_locked", "group_cap",
    "group_reserved", "lease_limit", "list_groups", "list_instances", "list_unreadable", "reap", "reap_locked",
    "set_group_limit", "set_limit", "set_limit_percent", "write_limit",
]

"""The owner's side of a budget record: one per KV pool, published by the process that maps the pool's memory.

Reservations take `fcntl.flock` on a per-group lock file. flock works across processes, is released by the kernel
when the holder dies (so a crashed engine never wedges its group), and needs no daemon. Under the lock a reservation
checks `sum(reserved of live members) + request <= cap` and bumps its own `reserved_bytes` before the memory is
mapped; releases only lower values and so need no lock. Hence the sum of reserved bytes never exceeds the cap at any
instant a reader holding the same lock can observe.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

from kvcached.budget.records import (
    CREATE_LOCK,
    LOCK_SUFFIX,
    RECORD_MAGIC,
    RECORD_SUFFIX,
    FileLock,
    GroupStruct,
    InstanceInfo,
    Mapped,
    RecordStruct,
    alive,
    group_path,
    open_group,
    process_start_time,
    read_instances,
    read_record,
    record_path,
    to_info,
    write_struct_atomically,
)
from kvcached.shm import check_name, ensure_dir, sanitize_name, shm_dir

GROUP_ENV = "KVCACHED_IPC_NAME"


def default_group() -> str:
    """$KVCACHED_IPC_NAME, else a name no other process uses (so an unnamed pool shares its budget with nobody)."""
    env = os.environ.get(GROUP_ENV)
    if env:
        return sanitize_name(env)
    return f"kvcached-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class BudgetRecord:
    """This process's record for one pool: reservations against its limit and its group's cap.

    Thread-safe. Several pools in one process each get their own record (a taken name gets a suffix).
    """

    def __init__(self, directory: Path, path: Path, record: Mapped, group: Mapped, lock: FileLock) -> None:
        self._dir = directory
        self._path = path
        self._record = record
        self._rec: RecordStruct = record.view  # type: ignore[assignment]
        self._groupmap = group
        self._group: GroupStruct = group.view  # type: ignore[assignment]
        self._group_lock = lock
        self._lock = threading.Lock()
        self._members: dict[str, tuple[int, Mapped]] = {}
        self._closed = False
        self.name = self._rec.name.decode()
        self.group = self._rec.group.decode()

    @classmethod
    def create(cls, virtual_bytes: int, *, name: str | None = None, group: str | None = None,
               limit_bytes: int | None = None, page_bytes: int = 0, pool_path: str | os.PathLike | None = None,
               backend: str = "host") -> "BudgetRecord":
        """Publish a record for a pool of `virtual_bytes`; limit defaults to the whole pool."""
        group = sanitize_name(group) if group else default_group()
        check_name(group, "group name")
        base = sanitize_name(name) if name else f"{group}-{os.getpid()}"
        check_name(base, "instance name")
        if virtual_bytes < 0 or (limit_bytes is not None and limit_bytes < 0):
            raise ValueError("virtual_bytes and limit_bytes cannot be negative")
        directory = ensure_dir(shm_dir())
        start = process_start_time(os.getpid())
        assert start is not None, "cannot read /proc/self/stat: kvcached needs Linux /proc"
        lock = FileLock(directory / CREATE_LOCK)
        with lock:
            chosen = base
            suffix = 1
            while True:
                existing = read_record(record_path(directory, chosen))
                if existing is None or not alive(existing.pid, existing.start_time, fresh=True):
                    break
                suffix += 1
                chosen = f"{base}-{suffix}"
            now = time.time()
            rec = RecordStruct(
                magic=RECORD_MAGIC, version=1, pid=os.getpid(), start_time=start, used_bytes=0,
                reserved_bytes=0, limit_bytes=virtual_bytes if limit_bytes is None else limit_bytes,
                virtual_bytes=virtual_bytes, page_bytes=page_bytes, used_pages=0, reserved_pages=0,
                created=now, name=chosen.encode(), group=group.encode(),
                backend=backend.encode()[:15], pool_path=os.fsencode(pool_path or b"")[:511])
            path = record_path(directory, chosen)
            record = write_struct_atomically(path, rec)
            groupmap = open_group(directory, group)
        lock.close()
        return cls(directory, path, record, groupmap, FileLock(directory / f"{group}{LOCK_SUFFIX}"))

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
        return to_info(RecordStruct.from_buffer_copy(bytes(self._record.mm)), self._path)

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
        return True

    def release(self, num_bytes: int, pages: int = 0) -> None:
        """Give back reserved bytes after unmapping (or after a failed map)."""
        with self._lock:
            rec = self._rec
            rec.reserved_bytes = max(0, rec.reserved_bytes - num_bytes)
            rec.reserved_pages = max(0, rec.reserved_pages - pages)

    def set_used(self, num_bytes: int, pages: int) -> None:
        """Publish how much of the reserved memory holds live blocks (the rest is warm or awaiting reclaim)."""
        with self._lock:
            self._rec.used_bytes = num_bytes
            self._rec.used_pages = pages

    def set_limit(self, num_bytes: int) -> None:
        if num_bytes < 0:
            raise ValueError(f"limit {num_bytes} is negative: give a size of 0 or more")
        self._rec.limit_bytes = num_bytes

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
                        mapped = Mapped(fd, RecordStruct)
                        cached = (mapped.inode, mapped)
                    except (ValueError, OSError):
                        continue
                    finally:
                        os.close(fd)
                    self._members[entry.name] = cached
                rec: RecordStruct = cached[1].view  # type: ignore[assignment]
                if rec.magic != RECORD_MAGIC or rec.group.decode() != self.group:
                    continue
                if alive(rec.pid, rec.start_time):
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
        self._rec = RecordStruct.from_buffer_copy(bytes(self._record.mm))  # keep reads valid after close
        self._record.close()
        self._group = GroupStruct.from_buffer_copy(bytes(self._groupmap.mm))
        self._groupmap.close()
        self._group_lock.close()

    def _forget_group_if_unused(self) -> None:
        """Remove an uncapped group's files once its last member leaves, so unnamed groups do not pile up.

        Done under the create lock, which every new member holds while publishing its record, so a member
        joining concurrently is either seen here (files kept) or creates fresh files after.
        """
        if self.group_cap is not None:
            return
        lock = FileLock(self._dir / CREATE_LOCK)
        try:
            with lock:
                if not any(i.group == self.group for i in read_instances(self._dir, fresh=False)):
                    group_path(self._dir, self.group).unlink(missing_ok=True)
                    (self._dir / f"{self.group}{LOCK_SUFFIX}").unlink(missing_ok=True)
        finally:
            lock.close()

    def __enter__(self) -> "BudgetRecord":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The owner's side of a budget record: one per KV pool, published by the process that maps the pool's memory.

Reservations take `fcntl.flock` on a per-group lock file. flock works across processes, is released by the kernel
when the holder dies (so a crashed engine never wedges its group), and needs no daemon. Under the lock a reservation
checks `sum(reserved of live members) + request <= cap` and bumps its own `reserved_bytes` before the memory is
mapped; releases only lower values and so need no lock. Hence the sum of reserved bytes never exceeds the cap at any
instant a reader holding the same lock can observe.

The owner writes its own counters (reserved, used) through its mapping; a change of its limit goes through the admin
module like everyone else's (`admin.write_limit`), under the record's lock. Other members' records and the group cap
are read with pread, never mapped, so a truncated or forged file cannot fault this process.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from kvcached.budget import admin, stores
from kvcached.budget.records import (
    CREATE_LOCK,
    NO_LEASE,
    RECORD_MAGIC,
    RECORD_SIZE,
    RECORD_SUFFIX,
    FileLock,
    GroupCapReader,
    InstanceInfo,
    Mapped,
    RecordStruct,
    UnreadableError,
    alive,
    check_bytes,
    effective_limit,
    lock_path,
    open_group,
    parse_record,
    read_exact,
    read_record,
    record_path,
    this_process,
    to_info,
    write_struct_atomically,
)
from kvcached.shm import check_name, ensure_dir, sanitize_name

GROUP_ENV = "KVCACHED_IPC_NAME"
RECORD_VERSION = 4
# How long a refused reservation counts as demand: the refused engine retries every scheduler step, renewing it.
DEMAND_TTL_S = 1.0


def default_group() -> str:
    """$KVCACHED_IPC_NAME, else a name no other process uses (so an unnamed pool shares its budget with nobody)."""
    env = os.environ.get(GROUP_ENV)
    if env:
        return sanitize_name(env)
    return f"kvcached-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class BudgetRecord:
    """This process's record for one pool: reservations against its limit and its group's cap.

    Thread-safe. Several pools in one process each get their own record (a taken name gets a suffix, unless
    `exact`: an engine whose name others use to find it gets that name or an error).
    """

    def __init__(self, directory: Path, path: Path, record: Mapped, lock: FileLock) -> None:
        self._dir = directory
        self._path = path
        self._record = record
        self._rec: RecordStruct = record.view  # type: ignore[assignment]
        self._group_lock = lock
        self._lock = threading.Lock()
        self._closed = False
        self.name = self._rec.name.decode()
        self.group = self._rec.group.decode()
        self._cap_reader = GroupCapReader(directory, self.group)

    @classmethod
    def create(cls, virtual_bytes: int, *, name: str | None = None, group: str | None = None,
               limit_bytes: int | None = None, page_bytes: int = 0, pool_path: str | os.PathLike | None = None,
               backend: str = "host", exact: bool = False) -> "BudgetRecord":
        """Publish a record for a pool of `virtual_bytes`; limit defaults to the whole pool.

        Records of processes that are gone are reaped first, so the directory does not fill with the dead."""
        group = sanitize_name(group) if group else default_group()
        check_name(group, "group name")
        base = sanitize_name(name) if name else f"{group}-{os.getpid()}"
        check_name(base, "instance name")
        virtual_bytes = check_bytes(virtual_bytes, "virtual_bytes")
        limit = check_bytes(virtual_bytes if limit_bytes is None else limit_bytes, "limit_bytes")
        page_bytes = check_bytes(page_bytes, "page_bytes")
        pool = os.fsencode(pool_path or b"")
        if len(pool) > 511:
            raise ValueError(f"pool path {pool_path!s} is longer than 511 bytes: use a shorter KVCACHED_SHM_DIR")
        directory = ensure_dir()
        pid, start = this_process()
        create_lock = FileLock(directory / CREATE_LOCK)
        try:
            with create_lock:
                admin.reap_locked(directory)
                chosen = cls._free_name(directory, base, exact)
                rec = RecordStruct(
                    magic=RECORD_MAGIC, version=RECORD_VERSION, pid=pid, start_time=start, used_bytes=0,
                    reserved_bytes=0, limit_bytes=limit, virtual_bytes=virtual_bytes, page_bytes=page_bytes,
                    used_pages=0, reserved_pages=0, created=time.time(), lease_limit_bytes=NO_LEASE,
                    lease_expires=0.0, lease_pid=0, lease_start_time=0, floor_bytes=0, retained_bytes=0,
                    wanted_bytes=0, wanted_at=0.0, name=chosen.encode(),
                    group=group.encode(), backend=backend.encode()[:15], pool_path=pool)
                path = record_path(directory, chosen)
                record = write_struct_atomically(path, rec)
                open_group(directory, group).close()
        finally:
            create_lock.close()
        return cls(directory, path, record, FileLock(lock_path(directory, group)))

    @staticmethod
    def _free_name(directory: Path, base: str, exact: bool) -> str:
        """`base`, or (unless exact) `base-2`, `base-3`... for the first name no live process holds."""
        chosen, suffix = base, 1
        while True:
            try:
                existing = read_record(record_path(directory, chosen))
                holder = (existing.pid, existing.start_time)
            except FileNotFoundError:
                return chosen
            except UnreadableError:
                return chosen  # reap_locked just left it: its writer lives on, but it is no record; replace it
            if not alive(*holder, fresh=True):
                return chosen
            if exact:
                raise FileExistsError(f"a live kvcached instance is already named {chosen!r} (pid {holder[0]}): give "
                                      "this engine another name (KVCACHED_INSTANCE), or stop the other one")
            suffix += 1
            chosen = f"{base}-{suffix}"

    # Reading the live values ------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    @property
    def limit_bytes(self) -> int:
        """The limit that binds now: the pool's limit, or a lease's lower one (a router's `kv` sleep)."""
        return effective_limit(self._rec)

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
        return self._cap_reader.cap()

    def info(self) -> InstanceInfo:
        return to_info(RecordStruct.from_buffer_copy(bytes(self._record.mm)), self._path)

    # Reservations -----------------------------------------------------------------------------------------
    def try_reserve(self, num_bytes: int) -> bool:
        """Count `num_bytes` as reserved if the limit and the group cap allow; call before mapping memory."""
        if num_bytes < 0:
            raise ValueError("try_reserve needs a non-negative byte count; use release() to give memory back")
        with self._lock, self._group_lock:
            rec = self._rec
            if rec.reserved_bytes + num_bytes > effective_limit(rec):
                return False
            cap = self.group_cap
            if cap is not None:
                over = self._others_reserved() + rec.reserved_bytes + num_bytes - cap
                if over > 0:
                    over -= stores.evict_from_group(self._dir, self.group, over)
                if over > 0:
                    # Say what is missing: the group's other engines give retained prefix cache back for it.
                    rec.wanted_at = time.monotonic()
                    rec.wanted_bytes = over
                    return False
            rec.reserved_bytes += num_bytes
            if rec.wanted_bytes:
                rec.wanted_bytes = 0
        return True

    def release(self, num_bytes: int) -> None:
        """Give back reserved bytes after unmapping (or after a failed map). More than is reserved is a bug."""
        if num_bytes < 0:
            raise ValueError("release needs a non-negative byte count")
        with self._lock:
            rec = self._rec
            if num_bytes > rec.reserved_bytes:
                raise ValueError(f"release of {num_bytes} bytes but only {rec.reserved_bytes} are reserved: "
                                 "double release?")
            rec.reserved_bytes -= num_bytes

    def set_used(self, num_bytes: int, pages: int, *, reserved_pages: int | None = None) -> None:
        """Publish how much of the reserved memory holds live blocks (the rest is warm or awaiting reclaim), and
        how many pages are mapped in all (shown by `kvctl list --json` and the stats endpoint)."""
        with self._lock:
            self._rec.used_bytes = num_bytes
            self._rec.used_pages = pages
            if reserved_pages is not None:
                self._rec.reserved_pages = reserved_pages

    def publish_idle_figures(self, floor_bytes: int, retained_bytes: int) -> None:
        """Publish what this pool holds beyond its requests' blocks: its floor (the null block's page, warm pages)
        and its retained prefix cache (shown by `kvctl list`, kvtop and the stats endpoint)."""
        with self._lock:
            self._rec.floor_bytes = max(0, floor_bytes)
            self._rec.retained_bytes = max(0, retained_bytes)

    def neighbour_demands(self) -> list[tuple[tuple[int, int], float, int]]:
        """Refusals of the other live members of this group in the last DEMAND_TTL_S: (who: pid and start time,
        when, bytes missing). What this pool may give back from its retained prefix cache; each refusal is one
        demand, to be served once (a refused engine renews it on its next try if it is still short)."""
        now = time.monotonic()
        return [((rec.pid, rec.start_time), rec.wanted_at, rec.wanted_bytes) for rec in self._other_members()
                if rec.wanted_bytes > 0 and 0 <= now - rec.wanted_at < DEMAND_TTL_S]

    def neighbour_demand(self) -> int:
        """Bytes the group's other members are short of now (the sum of their standing refusals)."""
        return sum(wanted for _, _, wanted in self.neighbour_demands())

    def set_limit(self, num_bytes: int) -> None:
        """Change this pool's own limit, through the admin protocol (under the record's lock)."""
        admin.write_limit(self._path, num_bytes, owner=(self._rec.pid, self._rec.start_time))

    def headroom(self) -> int:
        """Bytes that may still be reserved now under the limit and the group cap."""
        with self._lock, self._group_lock:
            rec = self._rec
            room = effective_limit(rec) - rec.reserved_bytes
            cap = self.group_cap
            if cap is not None:
                room = min(room, cap - self._others_reserved() - rec.reserved_bytes)
        return max(room, 0)

    def over_budget(self) -> int:
        """Bytes this pool should give back: over its own limit, or its share of its group being over the cap."""
        rec = self._rec
        over = rec.reserved_bytes - effective_limit(rec)
        cap = self.group_cap
        if cap is not None:
            with self._lock, self._group_lock:
                excess = self._others_reserved() + rec.reserved_bytes - cap
            over = max(over, min(excess, rec.reserved_bytes))
        return max(over, 0)

    def _other_members(self) -> Iterator[RecordStruct]:
        """Records of the other live members of this group (pread copies: nothing of theirs is mapped here)."""
        with os.scandir(self._dir) as entries:
            for entry in entries:
                if (not entry.name.endswith(RECORD_SUFFIX) or entry.name.startswith(".")
                        or entry.path == str(self._path)):
                    continue
                path = Path(entry.path)
                try:
                    rec = parse_record(read_exact(path, RECORD_SIZE), path)
                except (OSError, UnreadableError):
                    continue  # gone, or not a record anyone can trust: it reserves and wants nothing
                if rec.group.decode() == self.group and alive(rec.pid, rec.start_time):
                    yield rec

    def _others_reserved(self) -> int:
        """Sum of reserved bytes of the other live members of this group, its prefix stores included. Caller holds
        the group lock."""
        total = sum(rec.reserved_bytes for rec in self._other_members())
        return total + stores.store_bytes_of_group(self._dir, self.group)

    def close(self) -> None:
        """Remove this record (the pool is gone, its memory released)."""
        if self._closed:
            return
        self._closed = True
        create_lock = FileLock(self._dir / CREATE_LOCK)
        try:
            with create_lock:
                try:
                    if os.stat(self._path, follow_symlinks=False).st_ino == self._record.inode:
                        self._path.unlink()
                except OSError:
                    pass
                # An uncapped group's files go with its last member, so unnamed groups do not pile up; under the
                # create lock, which every new member holds while publishing its record.
                admin.forget_group_if_unused_locked(self._dir, self.group)
        finally:
            create_lock.close()
        self._rec = RecordStruct.from_buffer_copy(bytes(self._record.mm))  # keep reads valid after close
        self._record.close()
        self._group_lock.close()
        self._cap_reader.close()

    def __enter__(self) -> "BudgetRecord":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

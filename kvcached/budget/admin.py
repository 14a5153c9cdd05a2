"""The admin side of the budget: list records and groups, change limits and group caps, clean up after the dead.

kvctl, kvtop, kvlab and the router call these; an engine's own allocator uses BudgetRecord (owner.py) instead.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from kvcached.budget.records import (
    CREATE_LOCK,
    GROUP_SUFFIX,
    LOCK_SUFFIX,
    FileLock,
    GroupInfo,
    InstanceInfo,
    Mapped,
    RecordStruct,
    open_group,
    process_start_time,
    read_group_cap,
    read_instances,
)
from kvcached.shm import check_name, ensure_dir, sanitize_name, shm_dir


def list_instances(group: str | None = None, *, fresh: bool = True) -> list[InstanceInfo]:
    """All records (live and dead), sorted by group then name."""
    return [i for i in read_instances(shm_dir(), fresh=fresh) if group is None or i.group == group]


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
            name=name, cap_bytes=read_group_cap(directory, name), members=len(members),
            used_bytes=sum(i.used_bytes for i in members), reserved_bytes=sum(i.reserved_bytes for i in members),
            limit_bytes=sum(i.limit_bytes for i in members)))
    return groups


def group_cap(group: str) -> int | None:
    """The group's cap in bytes, or None when it has none."""
    return read_group_cap(shm_dir(), sanitize_name(group))


def group_reserved(group: str) -> int:
    """Sum of reserved bytes of the group's live members, read under the group lock (a consistent snapshot)."""
    directory = shm_dir()
    lock = FileLock(ensure_dir(directory) / f"{group}{LOCK_SUFFIX}")
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
        mapped = Mapped(fd, RecordStruct)
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
    check_name(group, "group name")
    directory = ensure_dir(shm_dir())
    known = {i.group for i in list_instances()} | {
        p.name[: -len(GROUP_SUFFIX)] for p in directory.glob(f"*{GROUP_SUFFIX}")}
    if group not in known and not create:
        raise KeyError(f"no kvcached group named {group!r} (known: {', '.join(sorted(known)) or 'none'}); "
                       "pass --create to set a cap before the engines start")
    lock = FileLock(directory / CREATE_LOCK)
    with lock:
        mapped = open_group(directory, group)
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
    lock = FileLock(directory / CREATE_LOCK)
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
            if group not in live_groups and read_group_cap(directory, group) is None:
                path.unlink(missing_ok=True)
                (directory / f"{group}{LOCK_SUFFIX}").unlink(missing_ok=True)
                removed.append(str(path))
        for tmp in directory.glob(".*.tmp"):
            pid = tmp.name.split(".")[-3] if tmp.name.count(".") >= 4 else ""
            if pid.isdigit() and process_start_time(int(pid)) is None:
                tmp.unlink(missing_ok=True)
    lock.close()
    return removed

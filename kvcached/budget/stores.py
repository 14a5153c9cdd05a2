"""Prefix stores as budget citizens: one small record per store in the shm directory, with its size, its cap and its
budget group, so `kvctl list` and `kvtop` show it beside the pools, `kvctl limit STORE SIZE` changes its cap, and a
group's cap counts its bytes.

The chunks themselves live in the store's directory (kvcached.prefix_store); this module knows only the record:
`used_bytes` is kept by the writers (a chunk saved or evicted, under the record's lock) and set right again by
every full scan, so a writer that died between a rename and its update leaves an error that the next scan mends.
Records are read like every file in the shm directory: as hostile input.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from kvcached.budget.records import (
    Mapped,
    UnreadableError,
    check_bytes,
    open_regular,
    read_exact,
    write_struct_atomically,
)
from kvcached.shm import check_name, checked_dir, ensure_dir, is_valid_name

STORE_SUFFIX = ".store"
STORE_MAGIC = b"KVCSTO1"
NO_CAP = -1


class StoreStruct(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_char * 8),
        ("version", ctypes.c_int64),
        ("limit_bytes", ctypes.c_int64),  # -1: no cap of its own (the group's cap still counts it)
        ("used_bytes", ctypes.c_int64),
        ("created", ctypes.c_double),
        ("name", ctypes.c_char * 128),
        ("group", ctypes.c_char * 128),
        ("root", ctypes.c_char * 512),
    ]


STORE_SIZE = ctypes.sizeof(StoreStruct)


@dataclass(frozen=True)
class StoreInfo:
    """A prefix store as `kvctl list` shows it: where its chunks are, what they hold, what it may hold."""

    name: str
    group: str
    root: str
    used_bytes: int
    limit_bytes: int | None
    exists: bool  # False once its directory is gone (the record is then reaped)
    path: str

    def to_dict(self) -> dict:
        return asdict(self)


def store_record_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{STORE_SUFFIX}"


def _text(raw: bytes, field: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnreadableError(f"its {field} is not valid UTF-8") from None


def parse_store(data: bytes, path: Path) -> StoreStruct:
    rec = StoreStruct.from_buffer_copy(data)
    if rec.magic != STORE_MAGIC:
        raise UnreadableError(f"unknown store format {bytes(rec.magic)!r}")
    name, group, root = _text(rec.name, "name"), _text(rec.group, "group"), _text(rec.root, "root")
    if name != path.name[: -len(STORE_SUFFIX)] or not is_valid_name(name) or not is_valid_name(group):
        raise UnreadableError(f"its name {name!r} or group {group!r} does not match the file {path.name}")
    if not os.path.isabs(root):
        raise UnreadableError(f"its root {root!r} is not an absolute path")
    if rec.used_bytes < 0 or rec.limit_bytes < NO_CAP:
        raise UnreadableError("its byte counts are out of range")
    return rec


def _info(rec: StoreStruct, path: Path) -> StoreInfo:
    root = rec.root.decode()
    return StoreInfo(name=rec.name.decode(), group=rec.group.decode(), root=root, used_bytes=rec.used_bytes,
                     limit_bytes=None if rec.limit_bytes < 0 else rec.limit_bytes, exists=os.path.isdir(root),
                     path=str(path))


def list_stores(group: str | None = None) -> list[StoreInfo]:
    """Every readable store record, sorted by name (stores whose directory is gone included, `exists` False)."""
    directory = checked_dir(create=False)
    if directory is None:
        return []
    out = []
    for path in sorted(directory.glob(f"*{STORE_SUFFIX}")):
        if path.name.startswith("."):
            continue
        try:
            info = _info(parse_store(read_exact(path, STORE_SIZE), path), path)
        except (OSError, UnreadableError):
            continue
        if group is None or info.group == group:
            out.append(info)
    return out


def find_store(name: str) -> StoreInfo:
    """The store named exactly `name`; KeyError naming the known ones otherwise."""
    directory = checked_dir(create=False)
    if directory is not None and is_valid_name(name):
        path = store_record_path(directory, name)
        try:
            return _info(parse_store(read_exact(path, STORE_SIZE), path), path)
        except FileNotFoundError:
            pass
        except UnreadableError as exc:
            raise KeyError(f"the prefix store record {name!r} cannot be read ({exc})") from None
    known = ", ".join(s.name for s in list_stores()) or "none"
    raise KeyError(f"no prefix store named {name!r} (known: {known}); `kvctl list` shows them")


def register_store(name: str, root: Path, group: str, limit_bytes: int | None) -> StoreInfo:
    """The store's record, created if absent. A record that exists keeps its cap (set by whoever created it, or
    by `kvctl limit`) unless `limit_bytes` asks for a lower one: the strictest wish binds."""
    check_name(name, "prefix store name")
    check_name(group, "group name")
    if limit_bytes is not None:
        limit_bytes = check_bytes(limit_bytes, "prefix store max_bytes")
    root_bytes = os.fsencode(str(root))
    if len(root_bytes) > 511 or not os.path.isabs(root):
        raise ValueError(f"prefix store directory {root} must be an absolute path of at most 511 bytes")
    directory = ensure_dir()
    path = store_record_path(directory, name)
    lock_fd = os.open(directory / f".{name}.store.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            existing = parse_store(read_exact(path, STORE_SIZE), path)
        except (FileNotFoundError, UnreadableError):
            existing = None
        if existing is None or existing.root.decode() != str(root):
            rec = StoreStruct(magic=STORE_MAGIC, version=1, limit_bytes=NO_CAP if limit_bytes is None else limit_bytes,
                              used_bytes=0, created=time.time(), name=name.encode(), group=group.encode(),
                              root=root_bytes)
            write_struct_atomically(path, rec).close()
        elif limit_bytes is not None and (existing.limit_bytes < 0 or limit_bytes < existing.limit_bytes):
            with _locked_store(path) as locked:
                locked.limit_bytes = limit_bytes
    finally:
        os.close(lock_fd)
    return find_store(name)


class _StoreEdit:
    """The fields of a locked store record for one read-modify-write (see admin._RecordEdit)."""

    def __init__(self, mapped: Mapped) -> None:
        object.__setattr__(self, "_mapped", mapped)

    def __getattr__(self, name: str) -> object:
        return getattr(self._mapped.view, name)

    def __setattr__(self, name: str, value: object) -> None:
        setattr(self._mapped.view, name, value)


@contextlib.contextmanager
def _locked_store(path: Path) -> Iterator[StoreStruct]:
    fd = open_regular(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = os.pread(fd, STORE_SIZE + 1, 0)
        if len(data) != STORE_SIZE:
            raise UnreadableError(f"{path.name} holds {len(data)} bytes, not {STORE_SIZE}")
        parse_store(data, path)
        mapped = Mapped(fd, StoreStruct)
        try:
            yield _StoreEdit(mapped)  # type: ignore[misc]
        finally:
            mapped.close()
    finally:
        os.close(fd)


def _record_of(name: str) -> Path:
    return Path(find_store(name).path)


def add_used(name: str, delta: int) -> None:
    """A writer saved (delta > 0) or evicted (delta < 0) chunks; the count never goes below 0."""
    with _locked_store(_record_of(name)) as rec:
        rec.used_bytes = max(0, min(rec.used_bytes + delta, (1 << 63) - 1))


def set_used(name: str, used_bytes: int) -> None:
    """The size a full scan found: mends whatever a writer that died between its rename and its update left."""
    used_bytes = check_bytes(used_bytes, "store used_bytes")
    with _locked_store(_record_of(name)) as rec:
        rec.used_bytes = used_bytes


def set_store_limit(name: str, limit_bytes: int | None) -> StoreInfo:
    """Change a store's cap (None: no cap of its own). Chunks above a lower cap go at the store's next write or
    `kvcached.prefix_store.PrefixStore.enforce_cap()` (kvctl calls it at once)."""
    if limit_bytes is not None:
        limit_bytes = check_bytes(limit_bytes, "prefix store limit")
    with _locked_store(_record_of(name)) as rec:
        rec.limit_bytes = NO_CAP if limit_bytes is None else limit_bytes
    return find_store(name)


def store_bytes_of_group(directory: Path, group: str) -> int:
    """What the stores of `group` hold: counted in the group's cap like the pools' reserved bytes."""
    total = 0
    for path in directory.glob(f"*{STORE_SUFFIX}"):
        if path.name.startswith("."):
            continue
        try:
            rec = parse_store(read_exact(path, STORE_SIZE), path)
        except (OSError, UnreadableError):
            continue
        if rec.group.decode() == group and os.path.isdir(rec.root.decode()):
            total += rec.used_bytes
    return total


def reap_stores_locked(directory: Path) -> list[str]:
    """Store records whose directory is gone (the caller holds the create lock)."""
    removed = []
    for path in directory.glob(f"*{STORE_SUFFIX}"):
        if path.name.startswith("."):
            continue
        try:
            rec = parse_store(read_exact(path, STORE_SIZE), path)
            gone = not os.path.isdir(rec.root.decode())
        except FileNotFoundError:
            continue
        except (OSError, UnreadableError):
            gone = True  # nobody can use a record nobody can read
        if gone:
            path.unlink(missing_ok=True)
            removed.append(str(path))
            lock = directory / f".{path.name}.lock"
            lock.unlink(missing_ok=True)
    return removed


def evict_from_group(directory: Path, group: str, nbytes: int) -> int:
    """A pool of `group` needs `nbytes` its cap cannot give: the group's prefix stores give up their least recently
    used chunks first (a cached prefix is worth less than a running request). Returns the bytes freed."""
    from kvcached.prefix_files import evict_lru

    freed = 0
    for info in list_stores(group):
        if freed >= nbytes or not info.exists:
            continue
        got = evict_lru(Path(info.root), nbytes - freed)
        if got:
            freed += got
            try:
                add_used(info.name, -got)
            except (KeyError, OSError, UnreadableError):
                pass
    return freed

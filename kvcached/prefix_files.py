"""A prefix store's files on disk: its chunk files (listed oldest use first, removed least recently used first) and
what a dead writer left half-written. Below both the store (kvcached.prefix_store) and the budget's store records
(kvcached.budget.stores), which evict chunks when a pool of the store's group needs the memory and clean up after
dead writers, so neither has to import the other for it."""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from kvcached.processes import process_start_time

CHUNK_SUFFIX = ".kv"
# A chunk being written: `.<key>.<writer pid>.<random>.tmp`, renamed into place when complete.
_TMP_RE = re.compile(r"^\.(?P<key>[0-9a-f]{32})\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")


@dataclass(frozen=True)
class ChunkFile:
    path: Path
    size: int
    mtime: float


def chunk_files(root: Path) -> list[ChunkFile]:
    """The chunks under a store's directory, oldest use first (never following a link)."""
    out: list[ChunkFile] = []
    try:
        model_dirs = [d for d in os.scandir(root) if d.is_dir(follow_symlinks=False)]
    except OSError:
        return out
    for model_dir in model_dirs:
        try:
            entries = list(os.scandir(model_dir.path))
        except OSError:
            continue
        for entry in entries:
            if not entry.name.endswith(CHUNK_SUFFIX) or entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append(ChunkFile(Path(entry.path), st.st_size, st.st_mtime))
    out.sort(key=lambda f: f.mtime)
    return out


def evict_lru(root: Path, nbytes: int) -> int:
    """Remove least recently used chunks of the store at `root` until `nbytes` are freed (or none is left); for a
    pool of the store's budget group that needs the memory. Returns the bytes removed."""
    removed = 0
    for f in chunk_files(root):
        if removed >= nbytes:
            break
        try:
            os.unlink(f.path)
            removed += f.size
        except OSError:
            continue
    return removed


def dead_writers_tmp(root: Path) -> list[Path]:
    """Half-written chunks whose writer is gone (its pid no longer runs): `kvctl cleanup` removes them."""
    out = []
    try:
        model_dirs = [d.path for d in os.scandir(root) if d.is_dir(follow_symlinks=False)]
    except OSError:
        return out
    for model_dir in model_dirs:
        try:
            names = os.listdir(model_dir)
        except OSError:
            continue
        for name in names:
            match = _TMP_RE.match(name)
            if match and process_start_time(int(match["pid"])) is None:
                out.append(Path(model_dir) / name)
    return out

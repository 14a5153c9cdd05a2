"""A prefix store: the KV of prompt prefixes, one chunk per full block, shared by every engine that opens the store.

Content-addressed. Block i of a prompt is keyed by a chained hash (blake2b, never Python's `hash()`): key_0 covers the
model fingerprint and the first block's token ids, key_i covers key_{i-1} and block i's token ids, so a key names a
block *and everything before it*. Two prompts share exactly the chunks of their common leading blocks, whatever
follows. The fingerprint (model, dtype, layers, KV heads, head size, block size) is part of the first key and of the
directory a chunk lives in, so engines of different shapes never read each other's chunks.

Where: a name means `$KVCACHED_SHM_DIR/prefix/<name>` (tmpfs: one node, memory shared through the page cache); a
path means that directory (a shared disk or NFS: several nodes). Writes are atomic (a temporary file, then a rename),
so a reader sees a whole chunk or none. Each chunk carries its size and an xxh3 checksum of its bytes: a truncated or
corrupt chunk is removed, never loaded. The store has a cap (bytes); past it, the least recently used chunks go
(a hit touches its chunk's mtime). Its size and cap are a record in the shm directory (`kvcached.budget.stores`),
so `kvctl` lists it and changes its cap, and its budget group's cap counts it.

Nothing here knows an engine: buffers in, buffers out (host memory; an engine copies to its device).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import stat
import struct
from array import array
from pathlib import Path
from typing import Sequence

import xxhash

from kvcached.budget import stores as records
from kvcached.prefix_files import CHUNK_SUFFIX, ChunkFile, chunk_files, dead_writers_tmp, evict_lru
from kvcached.shm import OPEN_FLAGS, check_name, sanitize_name, shm_dir

logger = logging.getLogger("kvcached")

CHUNK_MAGIC = b"KVCPFX1\0"
# magic, version, parts, part bytes, key (16), fingerprint (16), xxh3-64 of the payload
_HEADER = struct.Struct("<8sIIQ16s16sQ")
HEADER_BYTES = _HEADER.size
KEY_BYTES = 16


def model_fingerprint(**fields: object) -> str:
    """A stable id for a KV cache shape: equal fields give equal ids, on any machine, in any process."""
    text = "\n".join(f"{k}={fields[k]}" for k in sorted(fields))
    return hashlib.blake2b(text.encode(), digest_size=KEY_BYTES).hexdigest()


def chain_keys(fingerprint: str, token_ids: Sequence[int], block_size: int, max_blocks: int | None = None) -> list[str]:
    """Keys of the full blocks of `token_ids` (at most `max_blocks`), each covering every token before its end."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    digest = bytes.fromhex(fingerprint)
    keys = []
    for i in range(n):
        block = array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        digest = hashlib.blake2b(digest + block, digest_size=KEY_BYTES).digest()
        keys.append(digest.hex())
    return keys


def resolve(store: str) -> tuple[str, Path]:
    """(record name, directory) of a store given by name (`docs`: under $KVCACHED_SHM_DIR/prefix) or by path
    (anything with a `/`, or starting with `.` or `~`)."""
    if not isinstance(store, str) or not store.strip():
        raise ValueError("a prefix store is a name (letters, digits, . _ -) or a directory path")
    store = store.strip()
    if "/" in store or store.startswith((".", "~")):
        root = Path(os.path.abspath(os.path.expanduser(store)))
        tag = hashlib.blake2b(str(root).encode(), digest_size=4).hexdigest()
        return f"{sanitize_name(root.name or 'store')[:80]}-{tag}", root
    check_name(store, "prefix store name")
    return store, shm_dir() / "prefix" / store


class PrefixStore:
    """One store, opened for one model fingerprint. Thread-safe (every operation is a few system calls)."""

    def __init__(self, name: str, root: Path, fingerprint: str) -> None:
        if not re.fullmatch(r"[0-9a-f]{32}", fingerprint):
            raise ValueError(f"fingerprint {fingerprint!r} is not a model_fingerprint()")
        self.name = name
        self.root = root
        self.fingerprint = fingerprint
        self.dir = root / fingerprint
        self._fingerprint_bytes = bytes.fromhex(fingerprint)
        self._group = sanitize_name(f"prefix-{name}")
        self._max_bytes: int | None = None

    @classmethod
    def open(cls, store: str, fingerprint: str, *, max_bytes: int | None = None, group: str | None = None
             ) -> "PrefixStore":
        """Open (creating it if needed) the store `store` for chunks of `fingerprint`, and publish its record.

        `max_bytes` caps it (the lowest cap anyone asked for binds; `kvctl limit` changes it later); `group` is the
        budget group whose cap counts its bytes (default: $KVCACHED_IPC_NAME, else a group of its own)."""
        name, root = resolve(store)
        self = cls(name, root, fingerprint)
        self._group = sanitize_name(group or os.environ.get("KVCACHED_IPC_NAME") or f"prefix-{name}")
        self._max_bytes = max_bytes
        self._make_dirs()
        return self

    def _make_dirs(self) -> None:
        """Create the store's directory for this model (if needed), check it is ours, and publish its record."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(self.root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise PermissionError(f"prefix store {self.root} must be a directory of yours (not a link): "
                                  "choose another")
        records.register_store(self.name, self.root, self._group, self._max_bytes)

    # ---- keys to files ------------------------------------------------------------------------------------
    def chunk_path(self, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", key):
            raise ValueError(f"chunk key {key!r} is not a chain_keys() key")
        return self.dir / f"{key}{CHUNK_SUFFIX}"

    def leading_hits(self, keys: Sequence[str], part_bytes: int, parts: int) -> int:
        """How many of `keys`, from the first, have a chunk of the right size (a cheap stat; loading verifies)."""
        want = HEADER_BYTES + part_bytes * parts
        for i, key in enumerate(keys):
            try:
                st = os.stat(self.chunk_path(key), follow_symlinks=False)
            except OSError:
                return i
            if not stat.S_ISREG(st.st_mode) or st.st_size != want:
                return i
        return len(keys)

    # ---- load ---------------------------------------------------------------------------------------------
    def load_into(self, key: str, buffers: Sequence[memoryview]) -> bool:
        """Read chunk `key` straight into `buffers` (one per part, each exactly a part's size) and verify it.

        False when the chunk is missing, or truncated, corrupt, or of another shape (then it is removed): the
        buffers then hold garbage and the caller must compute those tokens itself."""
        path = self.chunk_path(key)
        try:
            fd = os.open(path, os.O_RDONLY | OPEN_FLAGS)
        except OSError:
            return False
        try:
            header = bytearray(HEADER_BYTES)
            want = HEADER_BYTES + sum(len(b) for b in buffers)
            got = os.preadv(fd, [header, *buffers], 0)
            extra = os.pread(fd, 1, want)
        except OSError as exc:
            logger.warning("kvcached: prefix store %s: cannot read %s (%s)", self.name, path.name, exc)
            return False
        finally:
            os.close(fd)
        reason = self._check(header, buffers, got, want, extra, key)
        if reason is not None:
            logger.warning("kvcached: prefix store %s: chunk %s %s; removed, the engine computes it", self.name,
                           path.name, reason)
            self._remove(path)
            return False
        try:
            os.utime(path)  # least recently used goes first: a hit makes it recent
        except OSError:
            pass
        return True

    def _check(self, header: bytearray, buffers: Sequence[memoryview], got: int, want: int, extra: bytes,
               key: str) -> str | None:
        if got != want or extra:
            return f"has {got if got != want else 'more than ' + str(want)} bytes, not {want}"
        magic, _version, parts, part_bytes, key_bytes, fingerprint, checksum = _HEADER.unpack(header)
        if magic != CHUNK_MAGIC:
            return "is not a kvcached chunk"
        if key_bytes.hex() != key or fingerprint != self._fingerprint_bytes:
            return "belongs to another key or model"
        if parts != len(buffers) or any(len(b) != part_bytes for b in buffers):
            return f"holds {parts} parts of {part_bytes} bytes, not what this engine needs"
        digest = xxhash.xxh3_64()
        for b in buffers:
            digest.update(b)
        if digest.intdigest() != checksum:
            return "is corrupt (checksum)"
        return None

    # ---- save ---------------------------------------------------------------------------------------------
    def save_from(self, key: str, buffers: Sequence[memoryview]) -> bool:
        """Write chunk `key` from `buffers` (one per part, equal sizes), atomically, within the store's cap.

        A chunk already there is only touched. False (and nothing left behind) when the store is full past what
        eviction can free, or the disk refuses: saving is an optimisation, never an error for the engine."""
        path = self.chunk_path(key)
        if os.path.exists(path):
            try:
                os.utime(path)
            except OSError:
                pass
            return True
        part_bytes = len(buffers[0]) if buffers else 0
        if any(len(b) != part_bytes for b in buffers):
            raise ValueError("every part of a chunk has the same size")
        size = HEADER_BYTES + part_bytes * len(buffers)
        if not self._make_room(size):
            return False
        digest = xxhash.xxh3_64()
        for b in buffers:
            digest.update(b)
        header = _HEADER.pack(CHUNK_MAGIC, 1, len(buffers), part_bytes, bytes.fromhex(key), self._fingerprint_bytes,
                              digest.intdigest())
        tmp = self.dir / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o600)
            except FileNotFoundError:
                # The store's directory was removed under us (kvctl cleanup, a user's rm): start it again, so the
                # engines on it go back to sharing instead of missing for the rest of their lives.
                self._make_dirs()
                self.enforce_cap()  # recount: the record may still count the chunks that went with the directory
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o600)
            try:
                written = os.writev(fd, [header, *buffers])
                if written != size:
                    raise OSError(f"short write ({written} of {size} bytes)")
            finally:
                os.close(fd)
            os.replace(tmp, path)  # atomic: a reader sees the whole chunk or none
        except (OSError, ValueError) as exc:  # ValueError: a store record another process damaged
            self._remove(tmp)
            logger.warning("kvcached: prefix store %s: cannot save a chunk (%s); prefixes still work, uncached",
                           self.name, exc)
            return False
        self._add_used(size)
        return True

    def _make_room(self, size: int) -> bool:
        info = self._record()
        if info is None:
            return True
        if info.limit_bytes is not None and size > info.limit_bytes:
            return False
        if info.limit_bytes is not None and info.used_bytes + size > info.limit_bytes:
            self.enforce_cap(extra=size)
            info = self._record()
            return info is not None and (info.limit_bytes is None or info.used_bytes + size <= info.limit_bytes)
        return True

    # ---- cap and eviction ---------------------------------------------------------------------------------
    def chunks(self) -> list[ChunkFile]:
        """Every chunk of every model in the store (oldest use first)."""
        return chunk_files(self.root)

    def enforce_cap(self, extra: int = 0) -> int:
        """Recount the store and remove least recently used chunks until it (plus `extra` bytes about to be
        written) fits its cap. Returns the bytes removed."""
        info = self._record()
        files = self.chunks()
        total = sum(f.size for f in files)
        removed = 0
        if info is not None and info.limit_bytes is not None:
            budget = info.limit_bytes - extra
            for f in files:
                if total - removed <= budget:
                    break
                if self._remove(f.path):
                    removed += f.size
        if info is not None:
            records.set_used(self.name, total - removed)
        return removed

    @classmethod
    def enforce_cap_of(cls, info: records.StoreInfo) -> int:
        """Apply a store's (new) cap now, whatever models its chunks are for (kvctl, after `kvctl limit`)."""
        return cls(info.name, Path(info.root), "0" * 32).enforce_cap()

    def _record(self) -> records.StoreInfo | None:
        try:
            return records.find_store(self.name)
        except KeyError:
            return None

    def _add_used(self, delta: int) -> None:
        try:
            records.add_used(self.name, delta)
        except (KeyError, OSError, ValueError):
            pass  # the record went (kvctl cleanup of a removed store): the next enforce_cap recounts

    def _remove(self, path: Path) -> bool:
        try:
            size = os.lstat(path).st_size
            os.unlink(path)
        except OSError:
            return False
        if path.suffix == CHUNK_SUFFIX:
            self._add_used(-size)
        return True


def remove_store(store: str) -> None:
    """Remove a store: its chunks, then (through the reaper, which drops records of stores whose directory is gone)
    its record. For a store made for one run; engines still on it just miss from then on."""
    import shutil

    from kvcached.budget import reap

    shutil.rmtree(resolve(store)[1], ignore_errors=True)
    reap()


def chunk_shape(path: Path) -> tuple[int, int] | None:
    """(parts, bytes per part) a chunk file says it holds; None when it is not a chunk. Its payload is unchecked."""
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        magic, _version, parts, part_bytes, *_ = _HEADER.unpack(header)
    except (OSError, struct.error):
        return None
    return (parts, part_bytes) if magic == CHUNK_MAGIC else None


__all__ = ["CHUNK_SUFFIX", "HEADER_BYTES", "PrefixStore", "chain_keys", "chunk_files", "chunk_shape",
           "dead_writers_tmp", "evict_lru", "model_fingerprint", "remove_store", "resolve"]


"""The shared-memory directory every kvcached process meets in, the names of what lives there, and boolean flags.

One place for these so the engine side, the admin side and the tools agree: `$KVCACHED_SHM_DIR` (default
/dev/shm/kvcached, a tmpfs) holds budget records, group caps, their lock files and the host backend's pool files.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

SHM_DIR_ENV = "KVCACHED_SHM_DIR"
DEFAULT_SHM_DIR = "/dev/shm/kvcached"
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
FALSE_VALUES = frozenset({"0", "false", "no", "off"})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def shm_dir() -> Path:
    """$KVCACHED_SHM_DIR, else /dev/shm/kvcached (read on every call so tests and tools can move it)."""
    return Path(os.environ.get(SHM_DIR_ENV) or DEFAULT_SHM_DIR)


def ensure_dir(directory: Path | None = None) -> Path:
    """The shm directory, created (owner-only) if it is missing."""
    directory = shm_dir() if directory is None else directory
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory


def flag(name: str) -> bool:
    """An environment variable read as a switch: `1`, `true`, `yes`, `on` (any case) mean on."""
    return os.environ.get(name, "").strip().lower() in TRUE_VALUES


def sanitize_name(text: str) -> str:
    """Map an arbitrary label (a model name, a path) to a safe file-name stem."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip("._-")[:100]
    return cleaned or "kvcached"


def check_name(name: str, what: str) -> None:
    """ValueError unless `name` is a safe file-name stem (what sanitize_name produces)."""
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' (at most 100 characters)")

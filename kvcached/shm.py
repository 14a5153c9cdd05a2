"""The shared-memory directory every kvcached process meets in, the names of what lives there, and boolean flags.

One place for these so the engine side, the admin side and the tools agree: `$KVCACHED_SHM_DIR` (default
/dev/shm/kvcached, a tmpfs) holds budget records, group caps, their lock files and the host backend's pool files.

Whoever can write that directory can forge the records every engine and tool trusts, so it must belong to the
current user and be writable by nobody else; `checked_dir` refuses anything else, naming the fix. Files in it are
opened with O_NOFOLLOW, so a planted symlink never redirects a write.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

SHM_DIR_ENV = "KVCACHED_SHM_DIR"
DEFAULT_SHM_DIR = "/dev/shm/kvcached"
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
FALSE_VALUES = frozenset({"0", "false", "no", "off"})
# Flags for every open of a file in the shm directory: never through a symlink, never inherited by children.
OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ShmDirError(PermissionError):
    """The shm directory is not safe to share state through; the message names the directory and the fix."""


def shm_dir() -> Path:
    """$KVCACHED_SHM_DIR, else /dev/shm/kvcached (read on every call so tests and tools can move it)."""
    return Path(os.environ.get(SHM_DIR_ENV) or DEFAULT_SHM_DIR)


def checked_dir(directory: Path | None = None, *, create: bool = True) -> Path | None:
    """The shm directory after checking it is a real directory of this user that nobody else can write.

    Creates it (mode 700) when missing and `create` is set; returns None when it is missing and `create` is not
    (a reader with nothing to read). Raises ShmDirError otherwise."""
    directory = shm_dir() if directory is None else Path(directory)
    if create:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError:
            pass  # a non-directory in the way: reported below
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        if create:
            raise
        return None
    fix = (f"set {SHM_DIR_ENV} to a directory of your own (it is created with mode 700), or remove {directory} "
           "if nothing else uses it")
    if stat.S_ISLNK(st.st_mode):
        raise ShmDirError(f"kvcached: {directory} is a symbolic link; shared state is never kept through one: {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise ShmDirError(f"kvcached: {directory} is not a directory: {fix}")
    if st.st_uid != os.geteuid():
        raise ShmDirError(f"kvcached: {directory} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): {fix}")
    if st.st_mode & 0o022:
        raise ShmDirError(f"kvcached: {directory} can be written by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                          f"`chmod 700 {directory}`, or {fix}")
    return directory


def ensure_dir(directory: Path | None = None) -> Path:
    """The shm directory, created if missing, checked (see checked_dir)."""
    checked = checked_dir(directory, create=True)
    assert checked is not None
    return checked


def flag(name: str) -> bool:
    """An environment variable read as a switch: `1`, `true`, `yes`, `on` (any case) mean on."""
    return os.environ.get(name, "").strip().lower() in TRUE_VALUES


def sanitize_name(text: str) -> str:
    """Map an arbitrary label (a model name, a path) to a safe file-name stem."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip("._-")[:100]
    return cleaned or "kvcached"


def is_valid_name(name: str) -> bool:
    return isinstance(name, str) and _NAME_RE.match(name) is not None


def check_name(name: str, what: str) -> None:
    """ValueError unless `name` is a safe file-name stem (what sanitize_name produces)."""
    if not is_valid_name(name):
        raise ValueError(f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' (at most 100 characters, "
                         "not starting with a punctuation mark)")

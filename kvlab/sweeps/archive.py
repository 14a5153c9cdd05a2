"""A run directory as bytes and back: how a run made on a Ray worker reaches the caller's results tree.

The archive comes from another machine, so unpacking treats it as hostile: only regular files and directories,
names inside the run directory, bounded size and count, and nothing lands at the destination until all of it has
been unpacked (one rename at the end, so a gathered run is whole or absent).
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

MAX_BYTES = 4 << 30  # unpacked: a run directory holds CSVs, figures and a notebook, not model weights
MAX_MEMBERS = 100_000


class ArchiveError(ValueError):
    """An archive that does not unpack into a run directory."""


def pack_run_dir(run_dir: Path | str) -> bytes:
    """The directory's regular files and subdirectories as a gzipped tar (links and other files are left out:
    they would point at the worker's filesystem)."""
    root = Path(run_dir)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in dirnames + sorted(filenames):
                path = Path(dirpath) / name
                if path.is_symlink() or not (path.is_file() or path.is_dir()):
                    continue
                tar.add(str(path), arcname=str(path.relative_to(root)), recursive=False)
    return buf.getvalue()


def _checked_name(name: str) -> str:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or any(part in ("..", "") for part in path.parts) or "\\" in name \
            or "\x00" in name:
        raise ArchiveError(f"archive member {name!r} would land outside the run directory")
    return str(path)


def _extract(data: bytes, into: Path) -> None:
    """Every member of the archive into the (empty) directory `into`, checked one by one."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            total = count = 0
            for member in tar:
                count += 1
                if count > MAX_MEMBERS:
                    raise ArchiveError(f"archive has over {MAX_MEMBERS} entries")
                name = _checked_name(member.name)
                target = into / name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise ArchiveError(f"archive member {name!r} is not a regular file or directory")
                total += member.size
                if total > MAX_BYTES:
                    raise ArchiveError(f"archive unpacks to over {MAX_BYTES >> 30} GiB")
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:
                    raise ArchiveError(f"archive member {name!r} has no data")
                with source, open(target, "xb") as out:  # "x": a name given twice is refused, not overwritten
                    shutil.copyfileobj(source, out)
    except (tarfile.TarError, EOFError, OSError) as e:  # not gzip, truncated, a file where a folder should be
        raise ArchiveError(f"not a whole run-directory archive: {e}") from None


def unpack_run_dir(data: bytes, dest: Path | str) -> Path:
    """Unpack `data` (from pack_run_dir) into the new directory `dest`, which must not exist yet."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        dest.mkdir()  # claims the name: a run that appears there meanwhile is never replaced
    except FileExistsError:
        raise FileExistsError(f"{dest} already exists: a gathered run never overwrites another") from None
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        _extract(data, staging)
        os.rename(staging, dest)  # onto the empty directory claimed above: the run appears whole, at once
    except BaseException:
        try:
            dest.rmdir()
        except OSError:
            pass
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


__all__ = ["ArchiveError", "MAX_BYTES", "pack_run_dir", "unpack_run_dir"]

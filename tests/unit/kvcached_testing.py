"""Shared helpers for the kvcached unit tests: region factories and a recording stand-in for a Region."""
from __future__ import annotations

import threading
from typing import Sequence

import pytest


def core_region_class():
    """kvcached._core.Region, or None while the extension is not built."""
    try:
        from kvcached import _core
    except ImportError:
        return None
    return getattr(_core, "Region", None)


class RecordingRegion:
    """TEST DOUBLE for the allocator logic only: remembers which pages are mapped, can be told to fail.

    It also records whether a lock it is given was held during a backend call, which the allocator promises
    never to do.
    """

    backend = "host"

    def __init__(self, size: int, page_size: int) -> None:
        self.size = size
        self.page_size = page_size
        self.num_pages = size // page_size
        self.mapped: set[int] = set()
        # An exception to raise at the next call (MemoryError: out of memory; OSError or RuntimeError: a fault),
        # after `fail_after` pages of the call took effect, as a backend that fails part-way would.
        self.fail_next_map: BaseException | bool | None = None
        self.fail_next_unmap: BaseException | None = None
        self.fail_after = 0
        self.watched_lock: threading.Lock | None = None
        self.calls_under_lock = 0
        self.maps = 0

    def _check_lock(self) -> None:
        if self.watched_lock is not None and self.watched_lock.locked():
            self.calls_under_lock += 1

    @property
    def num_mapped(self) -> int:
        return len(self.mapped)

    def is_mapped(self, page: int) -> bool:
        return page in self.mapped

    def map(self, pages: Sequence[int]) -> None:
        """All or nothing, as Region.map: a failure leaves nothing of this call mapped."""
        self._check_lock()
        if self.fail_next_map:
            exc = self.fail_next_map
            self.fail_next_map = None
            raise MemoryError("injected by RecordingRegion") if exc is True else exc
        self.maps += 1
        self.mapped |= set(pages)

    def unmap(self, pages: Sequence[int]) -> None:
        """Not all or nothing, as Region.unmap: a failure keeps the pages not yet released."""
        self._check_lock()
        if self.fail_next_unmap is not None:
            exc, self.fail_next_unmap = self.fail_next_unmap, None
            self.mapped -= set(sorted(set(pages))[: self.fail_after])
            raise exc
        self.mapped -= set(pages)

    def resident_pages(self) -> list[int]:
        return sorted(self.mapped)

    def close(self) -> None:
        self.mapped.clear()


def make_region(kind: str, size: int, page_size: int):
    if kind == "recording":
        return RecordingRegion(size, page_size)
    region_cls = core_region_class()
    if region_cls is None:
        pytest.skip("kvcached._core.Region is not built: run `.venv/bin/pip install -q -e .[test]`")
    return region_cls(size, page_size, backend="host")


def mapped_pages(region) -> set[int]:
    """Pages committed in the region: the double's record, or the real Region's is_mapped state."""
    if isinstance(region, RecordingRegion):
        return set(region.mapped)
    return {p for p in range(region.num_pages) if region.is_mapped(p)}


__all__ = ["RecordingRegion", "make_region", "mapped_pages", "core_region_class"]

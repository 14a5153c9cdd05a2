"""The block-level API an engine integration calls: which KV blocks are live, and memory only for those.

Blocks are grouped onto logical pages (layout.py). A page is acquired from the PageAllocator when its first
live block appears and released when its last one is freed. `alloc` prefers free blocks on pages that are
already partly used, so pages fill up and emptied pages can be given back.

Mapping runs outside the manager's lock too. Pages being acquired are *pending*: no other call places a
block on them until the acquisition commits or rolls back, so a failed map can never strand a live block
on an unmapped page.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from kvcached.budget import BudgetRecord
from kvcached.layout import KVLayout
from kvcached.page_allocator import MappableRegion, PageAllocator
from kvcached.physical_memory import physical_free_bytes


@dataclass(frozen=True)
class KVCacheStats:
    num_blocks: int
    live_blocks: int
    used_pages: int
    idle_pages: int
    reserved_pages: int
    used_bytes: int
    reserved_bytes: int
    limit_bytes: int
    virtual_bytes: int
    page_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


class KVCacheManager:
    """Live-block bookkeeping on top of a PageAllocator. Thread-safe."""

    def __init__(self, layout: KVLayout, region: MappableRegion, budget_record: BudgetRecord, *,
                 reserve_pages: int | None = None, reclaim_delay_s: float | None = None,
                 background: bool = True) -> None:
        self.layout = layout
        self.region = region
        self.budget = budget_record
        self.allocator = PageAllocator(layout, region, budget_record, reserve_pages=reserve_pages,
                                       reclaim_delay_s=reclaim_delay_s, background=background)
        n_pages = layout.num_logical_pages
        self._cond = threading.Condition(threading.Lock())
        self._live = bytearray(layout.num_blocks)
        self._num_live = 0
        self._refs = [0] * n_pages  # live blocks touching each page
        self._pending: set[int] = set()
        self._empty: set[int] = set(range(n_pages))  # refs == 0 and not pending
        # Free blocks by their first page; `_partial` = held pages (refs > 0, not pending) with free blocks there.
        self._home_free: list[set[int]] = [set(layout.blocks_of_page(g)) - (
            set(layout.blocks_of_page(g - 1)) if g else set()) for g in range(n_pages)]
        self._partial: set[int] = set()

    # Engine API -------------------------------------------------------------------------------------------
    def alloc(self, count: int) -> list[int] | None:
        """`count` free block ids, their memory mapped; None when memory or budget cannot hold them now."""
        if count <= 0:
            return []
        with self._cond:
            if count > self.layout.num_blocks - self._num_live:
                return None
            chosen = self._choose(count)
            if chosen is None:
                return None
            new_pages = self._mark_live(chosen)
        return chosen if self._commit(chosen, new_pages) else None

    def claim(self, block_ids: Iterable[int]) -> bool:
        """Make blocks the engine chose live and map their pages; all or nothing (False: cannot now)."""
        blocks = sorted(set(block_ids))
        if not blocks:
            return True
        for b in blocks:
            self.layout.pages_of_block(b)  # IndexError for ids outside the pool
        with self._cond:
            while any(p in self._pending for b in blocks for p in self.layout.pages_of_block(b)):
                self._cond.wait()
            taken = [b for b in blocks if self._live[b]]
            if taken:
                raise ValueError(f"blocks {taken[:8]} are already live: free them before claiming again")
            new_pages = self._mark_live(blocks)
        return self._commit(blocks, new_pages)

    def free(self, block_ids: Iterable[int]) -> None:
        """Blocks hold no live data any more; pages whose every block is free go back to the allocator."""
        blocks = list(block_ids)
        with self._cond:
            if len(set(blocks)) != len(blocks):
                raise ValueError("free() got the same block twice")
            dead = [b for b in blocks if not 0 <= b < self.layout.num_blocks or not self._live[b]]
            if dead:
                raise ValueError(f"blocks {dead[:8]} are not live: double free or foreign id")
            released = self._mark_free(blocks)
            # The allocator only moves state here (no backend call), so calling it under our lock is cheap.
            self.allocator.release_pages(released)

    def available_blocks(self) -> int:
        """Blocks that could be allocated now: bounded by the pool, the limit, the group cap and free memory."""
        with self._cond:
            free_virtual = self.layout.num_blocks - self._num_live
            on_held = sum(len(self._home_free[g]) for g in self._partial)
            empty_pages = len(self._empty)
        idle = len(self.allocator.idle_pages())
        new_bytes = min(self.budget.headroom(), physical_free_bytes(self.region))
        pages = min(empty_pages, idle + new_bytes // self.allocator.page_bytes)
        return max(0, min(free_virtual, on_held + pages * self.layout.page_size // self.layout.block_bytes))

    def resize(self, limit_bytes: int) -> None:
        """Change this pool's limit; shrinking gives idle pages back now and refuses growth until under it."""
        self.budget.set_limit(limit_bytes)
        self.allocator.reclaim()

    def trim(self) -> int:
        """Unmap every idle page now; returns logical pages released."""
        return self.allocator.trim()

    def stats(self) -> KVCacheStats:
        a = self.allocator.stats()
        with self._cond:
            live = self._num_live
        return KVCacheStats(
            num_blocks=self.layout.num_blocks, live_blocks=live, used_pages=a.in_use_pages,
            idle_pages=a.idle_pages, reserved_pages=a.mapped_pages, used_bytes=a.in_use_pages * a.page_bytes,
            reserved_bytes=self.budget.reserved_bytes, limit_bytes=self.budget.limit_bytes,
            virtual_bytes=self.layout.num_logical_pages * a.page_bytes, page_bytes=a.page_bytes)

    def pages_only_held_by(self, block_ids: Iterable[int]) -> int:
        """Logical pages whose every live block is among `block_ids`: what freeing those blocks would give back."""
        counts: Counter[int] = Counter()
        with self._cond:
            for b in block_ids:
                if 0 <= b < self.layout.num_blocks and self._live[b]:
                    counts.update(self.layout.pages_of_block(b))
            return sum(1 for page, n in counts.items() if n == self._refs[page])

    def live_blocks(self) -> int:
        return self._num_live

    def is_live(self, block: int) -> bool:
        return bool(self._live[block])

    def close(self) -> None:
        """Unmap everything. The region and the budget record stay open: their owner closes them."""
        self.allocator.close()

    def __enter__(self) -> "KVCacheManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Internals (called with self._cond held unless noted) -------------------------------------------------
    def _choose(self, count: int) -> list[int] | None:
        chosen: list[int] = []
        # 1. Free blocks on pages already held, fullest pages first.
        for g in sorted(self._partial, key=lambda g: -self._refs[g]):
            for b in sorted(self._home_free[g]):
                if all(self._refs[p] > 0 and p not in self._pending for p in self.layout.pages_of_block(b)):
                    chosen.append(b)
                    if len(chosen) == count:
                        return chosen
        # 2. Open new pages: ones the allocator still has mapped (idle) first, then the lowest.
        idle = [g for g in self.allocator.idle_pages() if g in self._empty]
        idle_set = set(idle)
        order = idle + sorted(self._empty - idle_set)
        taken = set(chosen)
        for g in order:
            for b in self.layout.blocks_of_page(g):  # includes a free block straddling in from a held page
                if self._live[b] or b in taken or any(p in self._pending for p in self.layout.pages_of_block(b)):
                    continue
                chosen.append(b)
                taken.add(b)
                if len(chosen) == count:
                    return chosen
        return None

    def _mark_live(self, blocks: Sequence[int]) -> list[int]:
        """Make blocks live; returns pages that went from empty to pending (the caller must acquire them)."""
        new_pages: list[int] = []
        for b in blocks:
            self._live[b] = 1
            pages = self.layout.pages_of_block(b)
            self._home_free[pages[0]].discard(b)
            for p in pages:
                if self._refs[p] == 0:
                    self._pending.add(p)
                    self._empty.discard(p)
                    new_pages.append(p)
                self._refs[p] += 1
            self._refresh(pages[0])
        self._num_live += len(blocks)
        return new_pages

    def _mark_free(self, blocks: Sequence[int]) -> list[int]:
        """Make blocks free; returns pages that became empty (to release or to forget)."""
        emptied: list[int] = []
        for b in blocks:
            self._live[b] = 0
            pages = self.layout.pages_of_block(b)
            self._home_free[pages[0]].add(b)
            for p in pages:
                self._refs[p] -= 1
                if self._refs[p] == 0:
                    emptied.append(p)
                    self._empty.add(p)
                    self._partial.discard(p)
            self._refresh(pages[0])
        self._num_live -= len(blocks)
        return emptied

    def _refresh(self, g: int) -> None:
        if self._refs[g] > 0 and g not in self._pending and self._home_free[g]:
            self._partial.add(g)
        else:
            self._partial.discard(g)

    def _commit(self, blocks: list[int], new_pages: list[int]) -> bool:
        """Acquire pending pages (without our lock), then make them held or roll the blocks back."""
        ok = True
        if new_pages:
            try:
                ok = self.allocator.acquire_pages(new_pages)
            except BaseException:
                ok = False
                raise
            finally:
                with self._cond:
                    self._pending.difference_update(new_pages)
                    if ok:
                        for p in new_pages:
                            self._refresh(p)
                    else:
                        # A held page can empty here too: its other blocks may have been freed meanwhile.
                        fresh = set(new_pages)
                        self.allocator.release_pages([p for p in self._mark_free(blocks) if p not in fresh])
                    self._cond.notify_all()
        return ok

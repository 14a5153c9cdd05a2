"""Scheduler side: decide which vLLM blocks are handed out, so physical pages follow the live blocks.

One `ElasticBlockPool` is attached to each vLLM `BlockPool` (as `pool._kvcached`). vLLM keeps its own free queue,
prefix cache and reference counts; kvcached decides *which* free block comes next (blocks on pages already
mapped, fullest pages first) and maps a page when its first block goes live.

Three kinds of blocks are held by kvcached's KVCacheManager (their pages stay mapped):
  * live blocks (vLLM ref_cnt > 0);
  * cached-free blocks: ref_cnt 0 but still in the prefix cache. They keep their memory so a later request can
    hit them, until they have been idle for `retention_s`; then the reclaimer evicts them from the prefix cache and
    frees them, so memory returns to idle after a load even with prefix caching on;
  * prefetched blocks: mapped for an allocation that `allocate_slots` is about to make (see `free_block_count`).

Admission. vLLM asks `get_num_free_blocks()` right after computing how many blocks a request needs, and only
calls `get_new_blocks()` if enough are free. Inside `allocate_slots` we answer with blocks that are already
mapped for this request (prefetched): mapping *is* the budget reservation, so a co-located engine cannot take the
memory between the check and the allocation. When the budget or physical memory cannot hold the request, the
answer is too small and vLLM's scheduler treats it as a miss: the request waits, nothing crashes.

Threads. The scheduler thread calls everything here; the reclaimer thread mutates vLLM's prefix cache only while
holding `lock`, which also wraps the Scheduler's entry points (see patches.py), so the two never interleave.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from kvcached.kv_cache_manager import KVCacheManager

logger = logging.getLogger("kvcached")

RECLAIM_TICK_S = 0.1
# How often the pool file is swept for pages a lagging worker wrote back after their unmap, under load too: such
# a page is memory no budget counts, so it must not wait for the engine to go idle.
SWEEP_INTERVAL_S = 2.0
# How long a free block stays in the prefix cache (holding its page) before kvcached reclaims it. Short, because
# an idle engine should hold no KV memory; raise KVCACHED_PREFIX_RETENTION_S to trade memory for prefix hits.
DEFAULT_RETENTION_S = 0.5


def _env_seconds(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


class ElasticBlockPool:
    def __init__(self, pool: Any, manager: KVCacheManager, *, watermark_blocks: int = 0,
                 retention_s: float | None = None, on_close: Any = None):
        self.pool = pool
        self.manager = manager
        self.lock = threading.RLock()
        self.watermark_blocks = watermark_blocks
        self.retention_s = (_env_seconds("KVCACHED_PREFIX_RETENTION_S", DEFAULT_RETENTION_S)
                            if retention_s is None else retention_s)
        self._prefetched: list[int] = []
        self._prefetched_at = 0.0
        self._cached_free: dict[int, float] = {}  # block id -> when it became free with a prefix-cache hash
        self._need: int | None = None  # blocks the current allocate_slots call needs (None: not inside one)
        self._on_close = on_close
        self._last_busy = time.monotonic()  # last time a request held a block (the null block aside)
        self._swept = False
        self._last_sweep = time.monotonic()
        self._closed = threading.Event()
        # The null block (id 0) pads block tables and is read by kernels: its page stays mapped for good.
        if not manager.claim([pool.null_block.block_id]):
            raise MemoryError("kvcached: not even one page fits the budget for vLLM's null block; raise the limit")
        self._reclaimer = threading.Thread(target=self._reclaim_loop, name="kvcached-prefix-reclaim", daemon=True)
        self._reclaimer.start()

    # Called from the vLLM hooks (scheduler thread) --------------------------------------------------------
    def begin_allocation(self) -> None:
        self._need = 0

    def note_need(self, num_blocks: int) -> None:
        if self._need is not None:
            self._need = num_blocks

    def end_allocation(self) -> None:
        self._need = None

    def free_block_count(self, vllm_count: int) -> int:
        """What `get_num_free_blocks` answers: mapped blocks for this allocation, or vLLM's own count outside one."""
        if self._need is None:
            return vllm_count
        target = self._need + self.watermark_blocks
        missing = target - len(self._prefetched)
        if missing > 0:
            self._prefetch(missing)
        self._prefetched_at = time.monotonic()
        return len(self._prefetched)

    def take(self, count: int) -> list[int]:
        """Block ids for `get_new_blocks(count)`: prefetched first, then freshly allocated."""
        ids = self._prefetched[:count]
        del self._prefetched[:count]
        if len(ids) < count:
            more = self._allocate(count - len(ids))
            if more is None:
                self.manager.free(ids)
                raise ValueError(f"Cannot get {count} free blocks from the pool: kvcached budget or memory is "
                                 "exhausted (raise it with `kvctl limit` or `kvctl group-limit`)")
            ids += more
        return ids

    def on_freed(self, blocks: list[Any]) -> None:
        """After vLLM's free_blocks: blocks whose ref_cnt reached 0 are free (or cached-free)."""
        now = time.monotonic()
        freed: list[int] = []
        seen: set[int] = set()
        for block in blocks:
            bid = block.block_id
            if block.ref_cnt != 0 or block.is_null or bid in seen or block.pool is not self.pool:
                continue
            seen.add(bid)
            if self.pool.enable_caching and block.block_hash is not None:
                self._cached_free[bid] = now
            else:
                freed.append(bid)
        if freed:
            self.manager.free(freed)

    def on_touch(self, blocks: Any) -> None:
        """Before vLLM's touch: a prefix hit on a cached-free block makes it live again (its page is mapped)."""
        for block in blocks:
            if block.ref_cnt == 0 and not block.is_null:
                if self._cached_free.pop(block.block_id, None) is None and not self.manager.is_live(block.block_id):
                    # Not expected: a cache hit on a block kvcached does not hold. Map it rather than crash.
                    logger.warning("kvcached: prefix hit on unheld block %d", block.block_id)
                    self.manager.claim([block.block_id])

    # Internals --------------------------------------------------------------------------------------------
    def _allocate(self, count: int) -> list[int] | None:
        ids = self.manager.alloc(count)
        if ids is None and self._cached_free:
            # Out of budget: give up prefix-cache entries, oldest first, as vLLM's own eviction would.
            self._evict_cached(oldest_first=count)
            ids = self.manager.alloc(count)
        return ids

    def _prefetch(self, count: int) -> None:
        ids = self._allocate(count)
        if ids is None:
            possible = min(count, self.manager.available_blocks())
            ids = self.manager.alloc(possible) if possible > 0 else None
        if ids:
            self._prefetched.extend(ids)

    def _evict_cached(self, *, oldest_first: int | None = None, older_than: float | None = None) -> int:
        """Drop cached-free blocks from the prefix cache and free them. Caller holds `lock` or is the scheduler."""
        victims = sorted(self._cached_free.items(), key=lambda kv: kv[1])
        if older_than is not None:
            victims = [kv for kv in victims if kv[1] <= older_than]
        if oldest_first is not None:
            victims = victims[:max(oldest_first, 1) * 4]
        ids: list[int] = []
        for bid, _ in victims:
            block = self.pool.blocks[bid]
            del self._cached_free[bid]
            if block.ref_cnt != 0:
                continue  # touched since; it is live and stays held
            self.pool._maybe_evict_cached_block(block)
            ids.append(bid)
        if ids:
            self.manager.free(ids)
        return len(ids)

    def _forget_uncached(self) -> None:
        """Cached-free blocks whose hash vLLM dropped (evict_blocks, reset_prefix_cache) are plain free blocks."""
        gone = [bid for bid in self._cached_free if self.pool.blocks[bid].block_hash is None]
        for bid in gone:
            del self._cached_free[bid]
        if gone:
            self.manager.free(gone)

    def reclaim_once(self) -> None:
        now = time.monotonic()
        with self.lock:
            self._forget_uncached()
            if self._cached_free:
                # Over the limit (kvctl limit, a router's sleep): prefix-cache entries give their pages up now.
                over = self.manager.budget.over_budget() > 0
                self._evict_cached(older_than=now if over else now - self.retention_s)
            if self._prefetched and self._need is None and now - self._prefetched_at >= self.retention_s:
                self.manager.free(self._prefetched)
                self._prefetched = []
            # Only blocks a request holds count: cached-free and prefetched blocks have their own clocks above,
            # and counting them here would make the trim wait a second retention period after the load ends.
            held = self.manager.live_blocks() - len(self._cached_free) - len(self._prefetched) - 1  # - null block
            if held > 0:
                self._last_busy = now
        if now - self._last_sweep >= SWEEP_INTERVAL_S:
            self._sweep(now)
        if now - self._last_busy < self.retention_s:
            self._swept = False
            return
        # No request has held a block for the retention time (and the prefix-cache entries it left have just
        # been evicted above): give the warm pages back now rather than after the allocator's own delay, so
        # memory is back to idle soon after the load ends.
        self.manager.trim()
        if not self._swept:
            self._sweep(now)  # once more after the trim: the last pages given back may have had a late writer
            self._swept = True

    def _sweep(self, now: float) -> None:
        """Punch pages of the pool file that hold data but are not committed: a worker whose view was a step
        behind an unmap wrote them back (the region knows which pages are committed)."""
        self._last_sweep = now
        strays = self.manager.region.sweep()
        if strays:
            logger.debug("kvcached: swept %d page(s) a lagging worker wrote back", strays)

    def _reclaim_loop(self) -> None:
        while not self._closed.wait(RECLAIM_TICK_S):
            try:
                self.reclaim_once()
            except Exception:  # never take the engine down from a background thread
                logger.exception("kvcached: reclaim failed")

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.manager.close()
        if self._on_close is not None:
            self._on_close()

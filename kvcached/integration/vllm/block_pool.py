"""Scheduler side: decide which vLLM blocks are handed out, so physical pages follow the live blocks.

One `ElasticBlockPool` is attached to each vLLM `BlockPool` (as `pool._kvcached`). vLLM keeps its own free queue,
prefix cache and reference counts; kvcached decides *which* free block comes next (blocks on pages already
mapped, fullest pages first) and maps a page when its first block goes live.

Three kinds of blocks are held by kvcached's KVCacheManager (their pages stay mapped):
  * live blocks (vLLM ref_cnt > 0);
  * cached-free blocks: ref_cnt 0 but still in the prefix cache (the *retained* prefix cache). They keep their
    memory while nobody needs it, so a repeated prefix is a hit as on a static pool, up to a cap
    (KVCACHED_MAX_CACHED_TOKENS); they go at once, least recently used first, when memory is wanted (see
    `reclaim_once`): evicted from vLLM's prefix cache first, then their pages are given back;
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
from kvcached.physical_memory import physical_free_bytes, physical_total_bytes
from kvcached.units import parse_size

logger = logging.getLogger("kvcached")
COST_REPORT_EVERY_S = 30.0  # the map/unmap cost line, at most this often

RECLAIM_TICK_S = 0.1
# How often the pool file is swept for pages a lagging worker wrote back after their unmap, under load too: such
# a page is memory no budget counts, so it must not wait for the engine to go idle.
SWEEP_INTERVAL_S = 2.0
# Once no request has held a block this long, warm pages (not the retained prefix cache) are given back at once
# instead of after the allocator's reclaim delay, so memory is back to its floor soon after a load ends.
IDLE_TRIM_S = 0.5
MAX_CACHED_TOKENS_ENV = "KVCACHED_MAX_CACHED_TOKENS"
DEFAULT_MAX_CACHED_TOKENS = 16_000  # upstream kvcached's default
RETENTION_ENV = "KVCACHED_PREFIX_RETENTION_S"
MIN_FREE_MEMORY_ENV = "KVCACHED_MIN_FREE_MEMORY"
DEFAULT_MIN_FREE_MEMORY = 512 << 20


class SchedulerClock:
    """Where kvcached's time goes on vLLM's scheduler thread: the scheduler's calls kvcached wraps (`schedule`,
    `update_from_output`, ...), the part of them spent in kvcached's hooks (maps a warm page did not spare
    included), and the waits for `ElasticBlockPool.lock` (held by the reclaimer). vLLM schedules between model
    steps, so this is elasticity's price on the engine's critical path; it is logged with the map cost. Only the
    scheduler thread writes it."""

    __slots__ = ("scheduler_s", "scheduler_calls", "hook_s", "hook_calls", "lock_wait_s", "depth")

    def __init__(self) -> None:
        self.scheduler_s = self.hook_s = self.lock_wait_s = 0.0
        self.scheduler_calls = self.hook_calls = self.depth = 0

    def hook(self, start: float) -> None:
        self.hook_s += time.perf_counter() - start
        self.hook_calls += 1

    def line(self) -> str:
        share = self.hook_s / self.scheduler_s if self.scheduler_s else 0.0
        return (f"kvcached's hooks took {self.hook_s:.3f} s of the scheduler's {self.scheduler_s:.3f} s "
                f"({100 * share:.1f}%, {self.hook_calls} calls, {1e6 * self.hook_s / max(self.hook_calls, 1):.0f} us "
                f"each), {self.lock_wait_s:.3f} s waiting for the reclaimer")


def _env_number(name: str, default: float | None, parse: Any = float) -> Any:
    """A non-negative number from the environment; a bad value is logged and the default used (an engine must
    not fail to start over a tuning knob)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = parse(text)
        if value < 0 or value != value:
            raise ValueError("negative or NaN")
        return value
    except (ValueError, OverflowError) as exc:
        logger.warning("kvcached: ignoring %s=%r (%s); using %s", name, text, exc, default)
        return default


class ElasticBlockPool:
    def __init__(self, pool: Any, manager: KVCacheManager, *, watermark_blocks: int = 0, block_tokens: int = 16,
                 max_cached_blocks: int | None = None, retention_s: float | None = None,
                 min_free_memory: int | None = None, on_close: Any = None):
        self.pool = pool
        self.manager = manager
        self.lock = threading.RLock()
        self.watermark_blocks = watermark_blocks
        if max_cached_blocks is None:
            tokens = _env_number(MAX_CACHED_TOKENS_ENV, DEFAULT_MAX_CACHED_TOKENS, int)
            max_cached_blocks = tokens // max(block_tokens, 1)
        self.max_cached_blocks = max_cached_blocks
        # No clock by default: retention follows pressure. The env knob adds one for users who want it.
        self.retention_s = _env_number(RETENTION_ENV, None) if retention_s is None else retention_s
        self.min_free_memory = (_env_number(MIN_FREE_MEMORY_ENV, DEFAULT_MIN_FREE_MEMORY, parse_size)
                                if min_free_memory is None else min_free_memory)
        # Short memory is relative to the machine: a small tmpfs (a container's /dev/shm) would otherwise be "short"
        # for good and retention silently off. At most a tenth of what the pages come from.
        total = physical_total_bytes(manager.region)
        self._low_memory = self.min_free_memory if total is None else min(self.min_free_memory, total // 10)
        self._prefetched: list[int] = []
        self._prefetched_at = 0.0
        self._cached_free: dict[int, float] = {}  # block id -> when it became free with a prefix-cache hash
        self._need: int | None = None  # blocks the current allocate_slots call needs (None: not inside one)
        # Prefix hits of the current allocate_slots call: cached-free blocks vLLM is about to touch. vLLM asks for
        # the free count *before* it touches them, so an eviction made to answer that count must spare them, or the
        # request would be handed a prefix whose block was just dropped (and its page maybe remapped, empty).
        self._pinned: frozenset[int] = frozenset()
        self._count_hits = True
        self._reserved_blocks = 0
        self._served: dict[tuple[int, int], float] = {}  # neighbour -> the refusal of theirs last served
        self._on_close = on_close
        self.clock = SchedulerClock()
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
    def begin_allocation(self, prefix_hits: frozenset[int] = frozenset(), *, count_hits: bool = True,
                         reserved_blocks: int = 0) -> None:
        """Inside allocate_slots: `prefix_hits` are spared by evictions; `count_hits` says vLLM counts every one of
        them as a block to allocate (full attention; a sliding window skips some, so they are not subtracted);
        `reserved_blocks` is what vLLM keeps back for other requests from the free count (async KV loads)."""
        self._need = 0
        self._pinned = prefix_hits
        self._count_hits = count_hits
        self._reserved_blocks = max(0, reserved_blocks)

    def note_need(self, num_blocks: int) -> None:
        if self._need is not None:
            self._need = num_blocks

    def end_allocation(self, admitted: bool = True) -> None:
        """After allocate_slots. A request that was not admitted keeps nothing mapped for it: blocks prefetched
        for a wait would hold memory a capped neighbour may need (two engines each holding part of a cap for a
        request that needs more would wait on each other for good); the next try maps again."""
        self._need = None
        self._pinned = frozenset()
        if not admitted and self._prefetched:
            self.manager.free(self._prefetched)
            self._prefetched = []

    def free_block_count(self, vllm_count: int) -> int:
        """What `get_num_free_blocks` answers: mapped blocks for this allocation, or vLLM's own count outside one."""
        if self._need is None:
            return vllm_count
        # vLLM counts a prefix hit that sits in its free queue as a block to allocate; kvcached already holds its
        # page, so it needs no new one: count it as free and prefetch only for the rest.
        held_hits = sum(1 for bid in self._pinned if bid in self._cached_free) if self._count_hits else 0
        target = self._need - held_hits + self.watermark_blocks + self._reserved_blocks
        missing = target - len(self._prefetched)
        # A need larger than the whole pool (vLLM's way of saying "not this step", or a request that can never
        # fit) maps nothing and evicts nothing: the answer is a miss either way.
        if 0 < missing and self._need <= self.manager.layout.num_blocks:
            self._prefetch(missing)
        self._prefetched_at = time.monotonic()
        return len(self._prefetched) + held_hits

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
            # vLLM 0.30+ blocks name the pool they belong to; a 0.25/0.26 engine has only this one.
            foreign = getattr(block, "pool", self.pool) is not self.pool
            if block.ref_cnt != 0 or block.is_null or bid in seen or foreign:
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
        """Drop cached-free blocks from the prefix cache and free them, least recently used first, never the
        prefix hits of the allocation in progress. Caller holds `lock` or is the scheduler."""
        victims = sorted((kv for kv in self._cached_free.items() if kv[0] not in self._pinned), key=lambda kv: kv[1])
        if older_than is not None:
            victims = [kv for kv in victims if kv[1] <= older_than]
        if oldest_first is not None:
            victims = victims[:max(oldest_first, 1) * 4]
        return self._evict([bid for bid, _ in victims])

    def _evict(self, block_ids: list[int]) -> int:
        ids: list[int] = []
        for bid in block_ids:
            block = self.pool.blocks[bid]
            del self._cached_free[bid]
            if block.ref_cnt != 0:
                continue  # touched since; it is live and stays held
            self.pool._maybe_evict_cached_block(block)
            ids.append(bid)
        if ids:
            self.manager.free(ids)
        return len(ids)

    def _evict_lru(self, count: int) -> int:
        oldest = sorted(self._cached_free.items(), key=lambda kv: kv[1])[:max(count, 0)]
        return self._evict([bid for bid, _ in oldest if bid not in self._pinned])

    def _forget_uncached(self) -> None:
        """Cached-free blocks whose hash vLLM dropped (evict_blocks, reset_prefix_cache) are plain free blocks."""
        gone = [bid for bid in self._cached_free if self.pool.blocks[bid].block_hash is None]
        for bid in gone:
            del self._cached_free[bid]
        if gone:
            self.manager.free(gone)

    def _pressure(self) -> tuple[str, int] | None:
        """Why (and how many bytes) memory is wanted now, or None: the retained prefix cache then stays. Reads
        only shared memory and the machine, no vLLM state: called outside `lock`, so a neighbour holding the
        group's lock never stalls the scheduler."""
        over = self.manager.budget.over_budget()
        if over > 0:
            return "over its limit or group cap", over
        fresh = [(who, at, wanted) for who, at, wanted in self.manager.budget.neighbour_demands()
                 if at > self._served.get(who, float("-inf"))]
        if fresh:
            for who, at, _ in fresh:
                self._served[who] = at  # each refusal is served once; a neighbour still short asks again
            return "a neighbour in its group wants memory", sum(wanted for _, _, wanted in fresh)
        free = physical_free_bytes(self.manager.region)
        if free < self._low_memory:
            return "free memory is short", self._low_memory - free
        return None

    def _give_back(self, reason: str, want_bytes: int) -> int:
        """Evict the least recently used retained blocks whose pages add up to `want_bytes` (a block on a page
        shared with others frees nothing alone, so the candidates grow until enough whole pages would go)."""
        page_bytes = self.manager.layout.logical_page_bytes
        lru = [bid for bid, _ in sorted(self._cached_free.items(), key=lambda kv: kv[1]) if bid not in self._pinned]

        def enough(n: int) -> bool:
            return self.manager.pages_only_held_by(lru[:n]) * page_bytes >= want_bytes

        # The fewest least recently used blocks that free enough: at least one block per page wanted; double
        # until enough, then bisect (blocks packed on pages need more than scattered ones).
        low, high = 0, max(1, -(-want_bytes // page_bytes))
        while high < len(lru) and not enough(high):
            low, high = high, high * 2
        high = min(high, len(lru))
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if enough(mid) else (mid, high)
        evicted = self._evict(lru[:high])
        if evicted:
            logger.debug("kvcached: gave back %d retained prefix block(s): %s", evicted, reason)
        return evicted

    def retained_figures(self) -> tuple[int, int]:
        """(floor bytes, retained bytes): the null block's page and warm pages; pages only the retained prefix
        cache keeps."""
        page_bytes = self.manager.layout.logical_page_bytes
        retained = self.manager.pages_only_held_by(self._cached_free) * page_bytes
        floor = (1 + len(self.manager.allocator.idle_pages())) * page_bytes
        return floor, retained

    def reclaim_once(self) -> None:
        now = time.monotonic()
        pressure = self._pressure() if self._cached_free else None
        if pressure is not None:
            # Warm and emptied pages go first (the trim below): only the rest comes out of the prefix cache.
            idle = len(self.manager.allocator.idle_pages()) * self.manager.layout.logical_page_bytes
            pressure = (pressure[0], pressure[1] - idle)
        gave_back = pressure is not None
        with self.lock:
            self._forget_uncached()
            if self._cached_free:
                if pressure is not None and pressure[1] > 0:
                    self._give_back(*pressure)
                self._enforce_cap()
                if self.retention_s is not None:
                    self._evict_cached(older_than=now - self.retention_s)
            if self._prefetched and self._need is None and now - self._prefetched_at >= IDLE_TRIM_S:
                self.manager.free(self._prefetched)
                self._prefetched = []
            # Only blocks a request holds count: cached-free and prefetched blocks have their own clocks above,
            # and counting them here would make the trim wait a second period after the load ends.
            held = self.manager.live_blocks() - len(self._cached_free) - len(self._prefetched) - 1  # - null block
            if held > 0:
                self._last_busy = now
        idle = now - self._last_busy >= IDLE_TRIM_S
        if gave_back or idle:
            # Memory is wanted, or no request has held a block for a while: the pages just emptied (and the warm
            # ones) go now, not after the allocator's reclaim delay; memory is back to its floor plus the
            # retained prefix cache.
            self.manager.trim()
        with self.lock:  # after the trim, so the figures describe what is held now
            self.manager.budget.publish_idle_figures(*self.retained_figures())
        if now - self._last_sweep >= SWEEP_INTERVAL_S:
            self._sweep(now)
        if not idle:
            self._swept = False
        elif not self._swept:
            self._sweep(now)  # once more after the trim: the last pages given back may have had a late writer
            self._swept = True

    def _enforce_cap(self) -> None:
        """At most `max_cached_blocks` retained blocks, and at most their worth of memory: blocks scattered over
        partly emptied pages hold more than their own bytes, so the pages they keep are capped too."""
        excess = len(self._cached_free) - self.max_cached_blocks
        if excess > 0:
            self._evict_lru(excess)
        layout = self.manager.layout
        cap_bytes = int(self.max_cached_blocks * layout.logical_page_bytes / max(layout.blocks_per_page, 1e-9))
        held = self.manager.pages_only_held_by(self._cached_free) * layout.logical_page_bytes
        if held > cap_bytes:
            self._give_back("the retained prefix cache is over its cap", held - cap_bytes)

    def _sweep(self, now: float) -> None:
        """Punch pages of the pool file that hold data but are not committed: a worker whose view was a step
        behind an unmap wrote them back (the region knows which pages are committed)."""
        self._last_sweep = now
        strays = self.manager.region.sweep()
        if strays:
            logger.debug("kvcached: swept %d page(s) a lagging worker wrote back", strays)

    def _reclaim_loop(self) -> None:
        seen = reported = 0  # the allocator's unmap count at the last tick, and at the last report
        last_report = -COST_REPORT_EVERY_S
        while not self._closed.wait(RECLAIM_TICK_S):
            try:
                self.reclaim_once()
                if time.monotonic() - last_report >= COST_REPORT_EVERY_S:
                    seen, now_reported = self._report_cost_when_settled(seen, reported)
                    if now_reported != reported:
                        reported, last_report = now_reported, time.monotonic()
            except Exception:  # never take the engine down from a background thread
                logger.exception("kvcached: reclaim failed")

    def _report_cost_when_settled(self, seen: int, reported: int) -> tuple[int, int]:
        """Log what the backend's map and unmap calls have cost so far, once a wave of unmaps has settled (pages went
        back since the last report, none since the last tick): an engine stopped by a signal never gets to log it at
        close. The loop asks at most every COST_REPORT_EVERY_S. Returns the new (seen, reported) unmap counts."""
        cost = self.manager.allocator.stats()
        if cost.unmap_pages == seen and seen != reported:
            logger.info("kvcached: %s; %s", _cost_line(cost), self.clock.line())
            return seen, seen
        return cost.unmap_pages, reported

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._reclaimer is not threading.current_thread():
            self._reclaimer.join(timeout=5.0)  # a tick in progress ends before the manager and the record go
        logger.info("kvcached: at close, %s; %s", _cost_line(self.manager.allocator.stats()), self.clock.line())
        self.manager.close()
        if self._on_close is not None:
            self._on_close()


def _cost_line(cost: Any) -> str:
    return (f"the backend has mapped {cost.map_pages} pages ({1e6 * cost.map_s / max(cost.map_pages, 1):.1f} us "
            f"each; {cost.demand_map_pages} of them while the scheduler waited, {cost.demand_map_s:.3f} s) and "
            f"unmapped {cost.unmap_pages} ({1e6 * cost.unmap_s / max(cost.unmap_pages, 1):.1f} us each)")

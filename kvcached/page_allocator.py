"""Commits and releases the physical memory behind logical pages, within a shared budget.

A logical page (see layout.py) is mapped when a caller acquires it and becomes *idle* when released.
Idle pages stay mapped for `reclaim_delay_s` so a burst that frees and re-allocates does not pay for
unmap + map, and while the pool is active some of them stay warm, mapped ahead by a background thread: the
*warm reserve*, as many pages as callers took in the last second (at least `reserve_pages`, at most
`max_reserve_bytes` and a sixteenth of the limit). A map on the caller's thread is a map an engine's scheduler
waits for (a 2 MiB CUDA page costs ~80 us, and a logical page spans one in every layer), so a burst's pages are
mapped ahead at the rate the burst takes them. The budget is checked before any memory is mapped.

Backend calls (Region.map/unmap) take milliseconds, so they never run under the allocator's lock: state is
reserved under the lock (MAPPING/UNMAPPING), the backend is called outside it, and the result is committed
or rolled back under the lock again. A backend error other than out-of-memory rolls every page it touched back
to what the region says it is, and is raised; nobody is left waiting on a page.

Accounting: the budget holds exactly the physical memory the region holds (its committed pages, plus on CUDA the
handles its pool keeps for reuse) and the reservations of maps in flight. A map reserves its worst case first
(every page new), and `_settle()` gives back what the region did not use, after every map, unmap and trim.
"""
from __future__ import annotations

import enum
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from kvcached.budget import BudgetRecord
from kvcached.layout import KVLayout
from kvcached.physical_memory import host_room_bytes
from kvcached.units import parse_size

RECLAIM_DELAY_ENV = "KVCACHED_RECLAIM_DELAY_S"
RESERVE_PAGES_ENV = "KVCACHED_RESERVE_PAGES"
MAX_RESERVE_ENV = "KVCACHED_MAX_RESERVE"
DEFAULT_RECLAIM_DELAY_S = 1.0
DEFAULT_RESERVE_PAGES = 2
DEFAULT_MAX_RESERVE_BYTES = 512 << 20
DEMAND_WINDOW_S = 1.0  # the warm reserve follows what callers took in this long
# Logical pages per backend call while mapping ahead: a map on the caller's thread waits for the region's lock at
# most one such call.
TOP_UP_CHUNK = 2

class PageState(enum.IntEnum):
    """Where a logical page is in its life. MAPPING, UNMAPPING and PREFETCHING are held while a backend call runs
    outside the lock; nobody else touches a page in those states."""

    UNMAPPED = 0
    MAPPING = 1
    IN_USE = 2
    IDLE = 3
    UNMAPPING = 4
    PREFETCHING = 5

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")


UNMAPPED, MAPPING, IN_USE, IDLE, UNMAPPING, PREFETCHING = PageState


class MappableRegion(Protocol):
    """What the allocator needs from kvcached._core.Region."""

    page_size: int
    num_pages: int

    def map(self, pages: Sequence[int]) -> None: ...
    def unmap(self, pages: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class AllocatorStats:
    in_use_pages: int
    idle_pages: int
    mapped_pages: int
    page_bytes: int
    # What the backend's map and unmap calls have cost so far (region pages, seconds): the price of elasticity
    # inside an engine, logged when the engine stops. `demand_map_*` is the part of the maps a caller waited for
    # (pages the warm reserve did not have ready); the rest ran ahead, on the background thread.
    map_pages: int = 0
    map_s: float = 0.0
    unmap_pages: int = 0
    unmap_s: float = 0.0
    demand_map_pages: int = 0
    demand_map_s: float = 0.0


def _env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse_size(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r}: {exc} (e.g. {name}=256M)") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds: set e.g. {name}=0.5") from None
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"{name}={raw!r} must be 0 or more")
    return value


class PageAllocator:
    """Maps logical pages of one region on demand, against a BudgetRecord. Thread-safe."""

    def __init__(self, layout: KVLayout, region: MappableRegion, budget: BudgetRecord, *,
                 reserve_pages: int | None = None, reclaim_delay_s: float | None = None,
                 max_reserve_bytes: int | None = None, background: bool = True) -> None:
        if region.page_size != layout.page_size:
            raise ValueError(f"region page size {region.page_size} differs from the layout's {layout.page_size}: "
                             "create the Region with page_size=layout.page_size")
        if region.num_pages * region.page_size < layout.region_size:
            raise ValueError(f"region holds {region.num_pages * region.page_size} bytes but the layout needs "
                             f"{layout.region_size}: create the Region with size=layout.region_size")
        self.layout = layout
        self.region = region
        self.budget = budget
        self.page_bytes = layout.logical_page_bytes
        self.reserve_pages = int(_env_float(RESERVE_PAGES_ENV, DEFAULT_RESERVE_PAGES)
                                 if reserve_pages is None else reserve_pages)
        self.reclaim_delay_s = (_env_float(RECLAIM_DELAY_ENV, DEFAULT_RECLAIM_DELAY_S)
                                if reclaim_delay_s is None else reclaim_delay_s)
        self.max_reserve_bytes = (_env_bytes(MAX_RESERVE_ENV, DEFAULT_MAX_RESERVE_BYTES)
                                  if max_reserve_bytes is None else max_reserve_bytes)
        self._demand: deque[tuple[float, int]] = deque()  # (when, pages) taken by callers, the last second's
        n = layout.num_logical_pages
        self._state = bytearray(n)  # a PageState per logical page (bytes: cheap to scan)
        self._idle_since: dict[int, float] = {}  # insertion order = oldest idle first
        # Idle pages an unmap left half done (some layers still mapped): mapped again before anyone reuses them.
        self._partial: set[int] = set()
        self._in_use = 0
        self._mapped = 0  # IN_USE + IDLE + UNMAPPING (memory still committed)
        # map pages, map seconds, unmap pages, unmap seconds, and the maps callers waited for (under _cond)
        self._backend_cost: list[float] = [0, 0.0, 0, 0.0, 0, 0.0]
        self._last_acquire = -math.inf
        self._want_topup = False
        self._cond = threading.Condition(threading.Lock())
        # The budget side: bytes reserved for maps in flight, and pooled CUDA handles promised to them.
        self._budget_lock = threading.Lock()
        self._pending_bytes = 0
        self._pool_claimed = 0
        self._has_pool = getattr(region, "backend", "host") == "cuda"
        self._stopped = False
        self._closed = False
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="kvcached-reclaim", daemon=True)
            self._thread.start()

    # Acquire / release ------------------------------------------------------------------------------------
    def acquire_pages(self, pages: Sequence[int]) -> bool:
        """Make `pages` usable (mapped, in use). All or nothing: False when the budget or memory says no."""
        wanted = sorted(set(pages))
        if not wanted:
            return True
        for p in wanted:
            if not 0 <= p < len(self._state):
                raise IndexError(f"logical page {p} is outside the pool (0..{len(self._state) - 1})")
        with self._cond:
            self._check_open()
            # A page on its way out (or being mapped ahead) is waited for, then taken like any other.
            while any(self._state[p] in (UNMAPPING, PREFETCHING) for p in wanted):
                self._cond.wait()
            busy = [p for p in wanted if self._state[p] in (IN_USE, MAPPING)]
            if busy:
                raise ValueError(f"logical pages {busy[:8]} are already in use: release them before acquiring again")
            reused, to_map = [], []
            for p in wanted:
                if self._state[p] == IDLE and p not in self._partial:
                    del self._idle_since[p]
                    self._state[p] = IN_USE
                    reused.append(p)
                else:
                    self._idle_since.pop(p, None)
                    self._state[p] = MAPPING
                    to_map.append(p)
            was_partial = self._partial.intersection(to_map)
            self._in_use += len(reused)
            self._last_acquire = time.monotonic()
            self._demand.append((self._last_acquire, len(wanted)))
        try:
            ok = not to_map or self._map(to_map, on_demand=True)
        except BaseException:
            self._roll_back(to_map, reused, was_partial)
            raise
        with self._cond:
            if ok:
                for p in to_map:
                    self._state[p] = IN_USE
                self._partial -= was_partial
                self._in_use += len(to_map)
                self._mapped += len(to_map) - len(was_partial)
                self._want_topup = True
                self._publish_used()
                self._cond.notify_all()
        if not ok:
            self._roll_back(to_map, reused, was_partial)
        return ok

    def _roll_back(self, to_map: list[int], reused: list[int], was_partial: set[int]) -> None:
        """Undo acquire_pages: pages it was mapping are as before (the region rolled its own work back: unmapped, or
        still half mapped), reused ones idle again."""
        with self._cond:
            now = time.monotonic()
            for p in to_map:
                if p in was_partial:
                    self._state[p] = IDLE
                    self._idle_since[p] = now
                else:
                    self._state[p] = UNMAPPED
            for p in reused:
                self._state[p] = IDLE
                self._idle_since[p] = now
            self._in_use -= len(reused)
            self._publish_used()
            self._cond.notify_all()

    def acquire(self, count: int) -> list[int] | None:
        """Any `count` pages, idle (already mapped) ones first; None when they cannot be had now."""
        if count <= 0:
            return []
        with self._cond:
            self._check_open()
            chosen = list(self._idle_since)[:count]
            for p in range(len(self._state)):
                if len(chosen) >= count:
                    break
                if self._state[p] == UNMAPPED:
                    chosen.append(p)
            if len(chosen) < count:
                return None
        # Another thread may take some of them meanwhile; acquire_pages then raises, and we retry once.
        try:
            return sorted(chosen) if self.acquire_pages(chosen) else None
        except ValueError:
            return self.acquire(count)

    def release_pages(self, pages: Sequence[int]) -> None:
        """Pages no longer hold live data: they go idle now and are unmapped after the reclaim delay."""
        if not pages:
            return
        if len(set(pages)) != len(pages):
            twice = sorted({p for p in pages if list(pages).count(p) > 1})
            raise ValueError(f"release_pages got logical pages {twice[:8]} more than once: double release")
        for p in pages:
            if not 0 <= p < len(self._state):
                raise IndexError(f"logical page {p} is outside the pool (0..{len(self._state) - 1})")
        with self._cond:
            wrong = [p for p in pages if self._state[p] != IN_USE]
            if wrong:
                state = PageState(self._state[wrong[0]]).label
                raise ValueError(f"logical pages {wrong[:8]} are not in use ({state}): "
                                 "double release?")
            now = time.monotonic()
            for p in pages:
                self._state[p] = IDLE
                self._idle_since[p] = now
            self._in_use -= len(pages)
            self._publish_used()
            self._cond.notify_all()
        if self._thread is None:
            self.reclaim()

    # Reclaim ----------------------------------------------------------------------------------------------
    def reclaim(self) -> int:
        """Unmap idle pages that are due, or as many as needed to get back under the budget. Returns pages unmapped."""
        over_pages = -(-self.budget.over_budget() // self.page_bytes)
        now = time.monotonic()
        with self._cond:
            active = now - self._last_acquire < self.reclaim_delay_s
            keep = self._reserve_target(now) if active else 0
            due = [p for p, t in self._idle_since.items() if now - t >= self.reclaim_delay_s]
            victims = due[:max(0, min(len(due), len(self._idle_since) - keep))]
            if over_pages > len(victims):
                chosen = set(victims)
                victims += [p for p in self._idle_since if p not in chosen][: over_pages - len(victims)]
            self._begin_unmap(victims)
        unmapped = self._finish_unmap(victims)
        if self.budget.over_budget() > 0:
            self._trim_pool()  # pooled handles are memory too: over the limit they go as well
        return unmapped

    def trim(self) -> int:
        """Unmap every idle page now (the warm reserve included). Returns pages unmapped."""
        with self._cond:
            while any(s == PREFETCHING for s in self._state):
                self._cond.wait()
            victims = list(self._idle_since)
            self._begin_unmap(victims)
        unmapped = self._finish_unmap(victims)
        self._trim_pool()
        return unmapped

    def _trim_pool(self) -> None:
        if self._has_pool:
            self.region.trim_pool(0)
            self._settle()

    def _make_room(self, num_bytes: int) -> None:
        """Unmap idle pages so that a reservation of `num_bytes` can fit (they are ours and nobody needs them)."""
        short = num_bytes - self.budget.headroom()
        if short <= 0:
            return
        with self._cond:
            victims = list(self._idle_since)[: -(-short // self.page_bytes)]
            self._begin_unmap(victims)
        self._finish_unmap(victims)

    def _begin_unmap(self, victims: list[int]) -> None:
        for p in victims:
            del self._idle_since[p]
            self._state[p] = UNMAPPING

    def _finish_unmap(self, victims: list[int]) -> int:
        if not victims:
            return 0
        try:
            self._timed(self.region.unmap, self._region_pages(victims), 2)
        except BaseException:
            # Part of the call may have happened: each page becomes what the region says it is (still mapped:
            # idle again, to be retried; gone: unmapped), and the budget follows the region.
            with self._cond:
                now = time.monotonic()
                for p in victims:
                    mapped = [self.region.is_mapped(rp) for rp in self.layout.region_pages(p)]
                    if any(mapped):
                        self._state[p] = IDLE
                        self._idle_since[p] = now
                        if not all(mapped):
                            self._partial.add(p)
                    else:
                        self._state[p] = UNMAPPED
                        self._partial.discard(p)
                        self._mapped -= 1
                self._publish_used()
                self._cond.notify_all()
            self._settle()
            raise
        with self._cond:
            for p in victims:
                self._state[p] = UNMAPPED
            self._partial.difference_update(victims)
            self._mapped -= len(victims)
            self._publish_used()
            self._cond.notify_all()
        self._settle()
        return len(victims)

    # Mapping ----------------------------------------------------------------------------------------------
    def _map(self, pages: list[int], *, on_demand: bool = False) -> bool:
        """Reserve budget, then map. On a refusal (budget or out of memory) roll back and report False; any other
        error rolls back too and is raised. `on_demand`: a caller waits for this map (counted apart), and idle pages
        are unmapped to make room for it; a map ahead never makes room."""
        region_pages = self._region_pages(pages)
        claim = self._reserve(len(region_pages))
        if claim is None:
            if not on_demand:
                return False
            self._make_room(len(region_pages) * self.region.page_size)
            claim = self._reserve(len(region_pages))
            if claim is None:
                return False
        try:
            self._timed(self.region.map, region_pages, 0, also=4 if on_demand else None)
            return True
        except MemoryError:
            return False
        finally:
            self._unclaim(claim)

    def _reserve(self, n_region_pages: int) -> tuple[int, int] | None:
        """Reserve budget for mapping `n_region_pages`: pooled handles are counted already, so only the pages the
        pool cannot supply need new bytes. Returns the claim (new bytes, pooled handles) or None if refused."""
        with self._budget_lock:
            pooled = max(0, self.region.pool_size - self._pool_claimed) if self._has_pool else 0
            from_pool = min(pooled, n_region_pages)
            new_bytes = (n_region_pages - from_pool) * self.region.page_size
            if new_bytes:
                # The machine before the budget: a claim no memory can back (a full tmpfs, a host out of memory)
                # is refused here, instead of being held in the record while the map fails.
                room = host_room_bytes(self.region)
                if room is not None and new_bytes > room - self._pending_bytes:  # maps in flight come first
                    return None
                if not self.budget.try_reserve(new_bytes):
                    return None
            self._pending_bytes += new_bytes
            self._pool_claimed += from_pool
            return new_bytes, from_pool

    def _unclaim(self, claim: tuple[int, int]) -> None:
        with self._budget_lock:
            self._pending_bytes -= claim[0]
            self._pool_claimed -= claim[1]
        self._settle()

    def _settle(self) -> None:
        """Give back whatever the budget holds beyond the region's physical memory and the maps in flight."""
        with self._budget_lock:
            held = self.region.num_mapped + (self.region.pool_size if self._has_pool else 0)
            excess = self.budget.reserved_bytes - held * self.region.page_size - self._pending_bytes
            if excess > 0:
                self.budget.release(excess)

    def _reserve_target(self, now: float) -> int:
        """How many idle pages to keep mapped ahead while the pool is active: what callers took in the last
        DEMAND_WINDOW_S, at least `reserve_pages`, at most `max_reserve_bytes` and a sixteenth of the limit or the
        group's cap (a reserve holds budget a neighbour may want). Caller holds _cond."""
        while self._demand and now - self._demand[0][0] > DEMAND_WINDOW_S:
            self._demand.popleft()
        recent = sum(n for _, n in self._demand)
        limit = self.budget.limit_bytes
        group_cap = self.budget.group_cap
        if group_cap is not None:
            limit = min(limit, group_cap)
        cap = min(self.max_reserve_bytes, limit // 16) // self.page_bytes
        return max(self.reserve_pages, min(recent, cap))

    def _top_up(self) -> None:
        """Map pages ahead so the next acquire finds them warm, TOP_UP_CHUNK at a time; only within budget, never
        making room. It takes the highest unmapped pages: callers open the lowest, so they rarely wait for one
        being mapped here."""
        while True:
            with self._cond:
                if not self._want_topup or self._stopped:
                    return
                missing = min(self._reserve_target(time.monotonic()) - len(self._idle_since), TOP_UP_CHUNK)
                pages: list[int] = []
                for p in range(len(self._state) - 1, -1, -1):
                    if len(pages) >= missing:
                        break
                    if self._state[p] == UNMAPPED:
                        pages.append(p)
                if not pages:
                    self._want_topup = False
                    return
                pages.sort()
                for p in pages:
                    self._state[p] = PREFETCHING
            if not self._map_ahead(pages):
                with self._cond:
                    self._want_topup = False
                return

    def _map_ahead(self, pages: list[int]) -> bool:
        """Map PREFETCHING `pages` and make them idle, or unmapped again; False when the budget or memory said no."""
        ok = False
        try:
            ok = self._map(pages)
        finally:
            with self._cond:
                now = time.monotonic()
                for p in pages:
                    if ok:
                        self._state[p] = IDLE
                        self._idle_since[p] = now
                    else:
                        self._state[p] = UNMAPPED
                if ok:
                    self._mapped += len(pages)
                self._publish_used()
                self._cond.notify_all()
        return ok

    def _region_pages(self, pages: list[int]) -> list[int]:
        out: list[int] = []
        for p in pages:
            out.extend(self.layout.region_pages(p))
        return out

    def _publish_used(self) -> None:
        """Caller holds the allocator's lock."""
        self.budget.set_used(self._in_use * self.page_bytes, self._in_use, reserved_pages=self._mapped)

    # Background thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        tick = max(0.02, min(0.25, self.reclaim_delay_s / 4))
        while True:
            with self._cond:
                if self._stopped:
                    return
                self._cond.wait(timeout=tick)
                if self._stopped:
                    return
            try:
                self.reclaim()
                self._top_up()
            except Exception as exc:  # keep reclaiming; a transient error must not leak memory forever
                print(f"kvcached: reclaim thread error: {exc!r}", flush=True)

    # Introspection / shutdown -----------------------------------------------------------------------------
    def page_state(self, page: int) -> str:
        return PageState(self._state[page]).label

    def idle_pages(self) -> list[int]:
        with self._cond:
            return list(self._idle_since)

    def stats(self) -> AllocatorStats:
        with self._cond:
            map_pages, map_s, unmap_pages, unmap_s, demand_pages, demand_s = self._backend_cost
            return AllocatorStats(in_use_pages=self._in_use, idle_pages=len(self._idle_since),
                                  mapped_pages=self._mapped, page_bytes=self.page_bytes, map_pages=int(map_pages),
                                  map_s=map_s, unmap_pages=int(unmap_pages), unmap_s=unmap_s,
                                  demand_map_pages=int(demand_pages), demand_map_s=demand_s)

    def _timed(self, call: Callable[[list[int]], None], region_pages: list[int], slot: int, *,
               also: int | None = None) -> None:
        """`call(region_pages)`, its cost added to _backend_cost[slot] (pages) and [slot + 1] (seconds), and to the
        pair at `also` too, when it succeeds."""
        start = time.perf_counter()
        call(region_pages)
        elapsed = time.perf_counter() - start
        with self._cond:
            for at in (slot,) if also is None else (slot, also):
                self._backend_cost[at] += len(region_pages)
                self._backend_cost[at + 1] += elapsed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the page allocator is closed: create a new one")

    def close(self) -> None:
        """Stop the reclaim thread and unmap every page (idle and in use)."""
        with self._cond:
            if self._closed:
                return
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            while any(s in (MAPPING, UNMAPPING, PREFETCHING) for s in self._state):
                self._cond.wait()
            self._closed = True
            victims = [p for p in range(len(self._state)) if self._state[p] in (IN_USE, IDLE)]
            for p in victims:
                self._state[p] = UNMAPPING
            self._idle_since.clear()
            self._in_use = 0
            self._publish_used()
        self._finish_unmap(victims)
        self._trim_pool()

    def __enter__(self) -> "PageAllocator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

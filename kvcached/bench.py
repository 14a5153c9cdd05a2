"""Map/unmap cost of kvcached pages through the budgeted allocator, against first-touch memset in the same run.

    python -m kvcached.bench [--backend host|cuda] [--pages N] [--duration S] [--json]
    (`kvlab bench alloc` runs the same.)

Each page goes through PageAllocator + BudgetRecord exactly as an engine's would (warm reserve off, reclaim
immediate, so every acquire is a real backend map and every release a real unmap). The baseline is what the
memory costs anyway: first touch (memset) of 2 MiB of fresh anonymous memory. A ratio
(map_us + unmap_us) / memset_us <= 1.0 means elasticity costs no more than touching the memory once.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import sys
import time

PAGE = 2 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("host", "cuda"), default="host")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of repetitions (default 3)")
    parser.add_argument("--pages", type=int, default=16, help="2 MiB pages per repetition (default 16)")
    parser.add_argument("--device", type=int, default=0, help="CUDA device (cuda backend)")


def _summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "n": len(ordered)}


def _memset_samples(reps: int) -> tuple[list[float], list[float]]:
    """µs to first-touch 2 MiB of fresh anonymous memory, and to memset 2 MiB already resident."""
    fresh, hot = [], []
    resident = mmap.mmap(-1, PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(resident))
    ctypes.memset(addr, 1, PAGE)
    for _ in range(reps):
        m = mmap.mmap(-1, PAGE)
        buf = ctypes.c_char.from_buffer(m)
        a = ctypes.addressof(buf)
        t0 = time.perf_counter()
        ctypes.memset(a, 1, PAGE)
        fresh.append((time.perf_counter() - t0) * 1e6)
        del buf
        m.close()
        t0 = time.perf_counter()
        ctypes.memset(addr, 2, PAGE)
        hot.append((time.perf_counter() - t0) * 1e6)
    return fresh, hot


def _map_unmap_samples(region, pages: int, duration: float, *, name: str) -> tuple[list[float], list[float]]:
    from kvcached.budget import BudgetRecord
    from kvcached.layout import KVLayout
    from kvcached.page_allocator import PageAllocator

    layout = KVLayout(num_blocks=pages, block_bytes=region.page_size, page_size=region.page_size)
    record = BudgetRecord.create(layout.region_size, name=name, page_bytes=layout.logical_page_bytes,
                                 backend=region.backend)
    alloc = PageAllocator(layout, region, record, reserve_pages=0, reclaim_delay_s=0.0, background=False)
    maps, unmaps = [], []
    try:
        stop = time.monotonic() + duration
        while True:
            for p in range(pages):
                t0 = time.perf_counter()
                if not alloc.acquire_pages([p]):
                    raise MemoryError(f"cannot map page {p}: the budget or free memory is too small; "
                                      "lower --pages or raise the limit (`kvctl limit`)")
                maps.append((time.perf_counter() - t0) * 1e6)
            for p in range(pages):
                t0 = time.perf_counter()
                alloc.release_pages([p])  # reclaim delay 0, no thread: unmapped within this call
                unmaps.append((time.perf_counter() - t0) * 1e6)
            if time.monotonic() >= stop:
                break
    finally:
        alloc.close()
        record.close()
    return maps, unmaps


def measure(backend: str = "host", duration: float = 3.0, pages: int = 16, device: int = 0) -> dict:
    """Run the benchmark; returns the result dict that --json prints."""
    from kvcached import _core

    if pages <= 0 or duration < 0:
        raise ValueError("--pages must be > 0 and --duration >= 0")
    if backend == "cuda" and not _core.cuda_available():
        raise RuntimeError("no CUDA device or driver found: run with --backend host")
    page_size = max(PAGE, _core.granularity(backend, device))
    result: dict = {"backend": backend, "page_bytes": page_size, "pages_per_rep": pages}
    half = duration / 2 if backend == "cuda" else duration
    t0 = time.perf_counter()
    region = _core.Region(pages * page_size, page_size, backend=backend, device=device)
    result["create_us"] = (time.perf_counter() - t0) * 1e6
    try:
        maps, unmaps = _map_unmap_samples(region, pages, half, name=f"bench-alloc-{os.getpid()}")
        if backend == "cuda":
            region.set_pool_limit(0)
            region.trim_pool(0)
            nmaps, nunmaps = _map_unmap_samples(region, pages, half, name=f"bench-alloc-nopool-{os.getpid()}")
            result["map_nopool_us"] = _summary(nmaps)
            result["unmap_nopool_us"] = _summary(nunmaps)
    finally:
        region.close()
    fresh, hot = _memset_samples(max(20, min(len(maps), 200)))
    result["map_us"] = _summary(maps)
    result["unmap_us"] = _summary(unmaps)
    result["memset_us"] = _summary(fresh)
    result["hot_memset_us"] = _summary(hot)
    ratio = (result["map_us"]["median"] + result["unmap_us"]["median"]) / result["memset_us"]["median"]
    result["ratio"] = ratio
    result["goal"] = 1.0
    result["pass"] = ratio <= 1.0
    return result


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kvcached alloc ({result['backend']}, {result['page_bytes'] >> 20} MiB pages, "
                        f"{result['map_us']['n']} maps)")
    table.add_column("what")
    table.add_column("median µs", justify="right")
    table.add_column("p90 µs", justify="right")
    labels = [("map_us", "map (budget + backend)"), ("unmap_us", "unmap (backend + budget)"),
              ("map_nopool_us", "map, no handle pool"), ("unmap_nopool_us", "unmap, no handle pool"),
              ("memset_us", "first-touch memset 2 MiB"), ("hot_memset_us", "memset resident 2 MiB")]
    for key, label in labels:
        if key in result:
            table.add_row(label, f"{result[key]['median']:.1f}", f"{result[key]['p90']:.1f}")
    table.add_row("region create", f"{result['create_us']:.1f}", "")
    verdict = "[green]pass[/]" if result["pass"] else "[red]fail[/]"
    table.add_row("(map+unmap)/memset", f"{result['ratio']:.2f}", f"goal <= {result['goal']:.1f}: {verdict}")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcached.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = measure(args.backend, args.duration, args.pages, args.device)
    except (RuntimeError, ValueError, OSError, MemoryError) as exc:
        print(f"kvcached bench: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

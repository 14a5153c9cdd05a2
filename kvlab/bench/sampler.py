"""CPU cost of kvlab's memory sampler: 100 Hz of a process tree's /proc figures as a share of one core.

The tree is made for the run (a parent and two children, each holding memory, like a vLLM API server,
engine and worker). The sampler runs for --duration seconds; its threads' CPU time (their own CPU clocks,
so the benchmark's own work is not counted) divided by the wall time is the cost. The goal is <= 2% of a
core at 100 Hz. The same run also times one cheap tree read and one PSS read (smaps_rollup), which is why
PSS runs at 1 Hz: the table shows what 100 Hz of PSS would cost.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from statistics import median

from kvlab.bench import report

GOAL_CPU_PCT = 2.0

# A parent that forks two children; each holds 32 MiB of its own. Waits for stdin EOF.
_TREE = """
import os, sys
kids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        held = bytearray(32 << 20)
        sys.stdin.read()
        os._exit(0)
    kids.append(pid)
held = bytearray(32 << 20)
print("ready", flush=True)
sys.stdin.read()
for pid in kids:
    os.waitpid(pid, 0)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per sampler setting (default 5)")
    parser.add_argument("--rate", type=float, default=100.0, help="samples per second (default 100)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _sampler_cost(root: int, interval_s: float, duration: float, pss_interval_s: float | None) -> dict:
    from kvlab.probes import HostTreeSource, MemorySampler

    sampler = MemorySampler([HostTreeSource("bench", root, pss_interval_s=pss_interval_s)], interval_s=interval_s)
    t0 = time.monotonic()
    sampler.start()
    time.sleep(duration)
    wall = time.monotonic() - t0
    cpu = sampler.cpu_time_s()  # before stop(): stop() samples once more from this thread
    ticks = sampler.ticks().get(interval_s, 0)
    sampler.stop()
    if sampler.errors:
        raise RuntimeError(f"sampler errors: {sampler.errors[:3]}")
    return {"wall_s": wall, "cpu_s": cpu, "cpu_pct_of_core": 100.0 * cpu / wall, "ticks": ticks,
            "achieved_hz": ticks / wall, "samples": len(sampler.samples())}


def _read_cost_us(read, pids: list[int], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        read(pids)
        times.append((time.perf_counter() - t0) * 1e6)
    return median(times)


def measure(duration: float = 5.0, rate: float = 100.0) -> dict:
    """Run the benchmark; returns the dict that --json prints."""
    from kvlab.probes.proc import process_tree, tree_memory, tree_pss

    if duration <= 0 or rate <= 0:
        raise ValueError("--duration and --rate must be > 0")
    proc = subprocess.Popen([sys.executable, "-c", _TREE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the benchmark's process tree failed to start")
        pids = process_tree(proc.pid)
        interval = 1.0 / rate
        result: dict = {"rate_hz": rate, "processes": len(pids), "duration_s": duration,
                        "tree_read_us": _read_cost_us(tree_memory, pids, 200),
                        "pss_read_us": _read_cost_us(tree_pss, pids, 20),
                        "cheap": _sampler_cost(proc.pid, interval, duration, None),
                        "cheap_plus_pss_1hz": _sampler_cost(proc.pid, interval, duration, 1.0)}
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    result["pss_at_rate_pct_of_core"] = result["pss_read_us"] * rate / 1e4
    result["goal_cpu_pct"] = GOAL_CPU_PCT
    result["pass"] = result["cheap"]["cpu_pct_of_core"] <= GOAL_CPU_PCT
    return result


def _print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kvlab memory sampler: {r['rate_hz']:g} Hz on a tree of {r['processes']} processes, "
                        f"{r['duration_s']:g} s each")
    for col, justify in (("setting", "left"), ("CPU % of one core", "right"), ("achieved Hz", "right"),
                         ("samples", "right")):
        table.add_column(col, justify=justify)
    for key, label in (("cheap", "/proc status (mem_bytes)"), ("cheap_plus_pss_1hz", "status + PSS at 1 Hz")):
        row = r[key]
        table.add_row(label, f"{row['cpu_pct_of_core']:.2f}", f"{row['achieved_hz']:.1f}", str(row["samples"]))
    table.add_row(f"PSS at {r['rate_hz']:g} Hz (from one read)", f"{r['pss_at_rate_pct_of_core']:.1f}", "", "")
    table.add_row("one tree read (status / PSS)", f"{r['tree_read_us']:.0f} µs / {r['pss_read_us']:.0f} µs", "", "")
    verdict = "[green]pass[/]" if r["pass"] else "[red]fail[/]"
    table.add_row("goal", f"<= {r['goal_cpu_pct']:.1f}: {verdict}", "", "")
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    return report("sampler", lambda: measure(args.duration, args.rate), _print_table, args.json)

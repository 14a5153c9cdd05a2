"""kvtop: a live view of kvcached pools: per-pool bars of used / reserved against the limit, prefix stores (the
bytes of shared prompt-prefix KV each holds, against its cap), group caps, and device memory when NVML is
available. `kvtop --once` prints one frame (for scripts and CI).

Each frame first reaps what dead processes left (kvcached.budget.reap), so the view shows the living; record files
that cannot be read are listed apart, never decoded."""
from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kvcached import budget
from kvcached.shm import ShmDirError, shm_dir
from kvcached.units import format_size

BAR_WIDTH = 30


def usage_bar(used: int, reserved: int, limit: int, width: int = BAR_WIDTH) -> Text:
    """'█' used, '▒' reserved but idle, '·' free under the limit."""
    total = max(limit, reserved, 1)
    n_used = round(width * used / total)
    n_res = max(0, round(width * reserved / total) - n_used)
    bar = Text()
    bar.append("█" * n_used, style="green")
    bar.append("▒" * n_res, style="yellow")
    bar.append("·" * max(0, width - n_used - n_res), style="dim")
    return bar


def device_memory() -> list[tuple[str, int, int]]:
    """(name, used, total) per NVIDIA device, empty when NVML is absent (no driver, no GPU)."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        out = []
        for k in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(k)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            out.append((f"GPU{k} {name.decode() if isinstance(name, bytes) else name}", int(mem.used), int(mem.total)))
        return out
    finally:
        pynvml.nvmlShutdown()


def build_frame() -> Group:
    """One frame: pools, groups, devices."""
    instances = budget.list_instances()
    pools = Table(title=f"kvcached pools ({shm_dir()})", expand=False)
    for col in ("name", "group", "pid", "used", "reserved", "floor", "retained", "limit", "virtual"):
        pools.add_column(col, justify="right" if col not in ("name", "group") else "left")
    pools.add_column("used █ / reserved ▒ of limit", min_width=BAR_WIDTH, no_wrap=True)
    for i in instances:
        name = Text(i.name) if i.alive else Text(f"{i.name} (dead)", style="red")
        limit = format_size(i.effective_limit_bytes) + (" (lease)" if i.lease_limit_bytes is not None else "")
        pools.add_row(name, i.group, str(i.pid), format_size(i.used_bytes), format_size(i.reserved_bytes),
                      format_size(i.floor_bytes), format_size(i.retained_bytes), limit, format_size(i.virtual_bytes),
                      usage_bar(i.used_bytes, i.reserved_bytes, i.effective_limit_bytes))
    unreadable = budget.list_unreadable()
    for u in unreadable:
        pools.add_row(Text(f"{u.name} (unreadable)", style="red"), "?", str(u.pid or "?"), *[""] * 6,
                      Text(u.reason[:BAR_WIDTH * 2], style="red"))
    if not instances and not unreadable:
        pools.add_row("(no pools)", *[""] * 9)
    parts: list = [pools]
    stores = budget.list_stores()
    if stores:
        st = Table(title="prefix stores")
        for col in ("store", "group", "holds", "cap", "where"):
            st.add_column(col)
        st.add_column("holds of cap", min_width=BAR_WIDTH, no_wrap=True)
        for s in stores:
            name = Text(s.name) if s.exists else Text(f"{s.name} (gone)", style="red")
            cap = "none" if s.limit_bytes is None else format_size(s.limit_bytes)
            bar = usage_bar(s.used_bytes, s.used_bytes, s.limit_bytes) if s.limit_bytes else Text("")
            st.add_row(name, s.group, format_size(s.used_bytes), cap, s.root, bar)
        parts.append(st)
    groups = budget.list_groups()
    if groups:
        gt = Table(title="groups")
        for col in ("group", "live", "used", "reserved", "cap"):
            gt.add_column(col)
        gt.add_column("reserved of cap", min_width=BAR_WIDTH, no_wrap=True)
        for g in groups:
            cap = "none" if g.cap_bytes is None else format_size(g.cap_bytes)
            bar = usage_bar(g.used_bytes, g.reserved_bytes, g.cap_bytes) if g.cap_bytes is not None else Text("")
            gt.add_row(g.name, str(g.members), format_size(g.used_bytes), format_size(g.reserved_bytes), cap, bar)
        parts.append(gt)
    devices = device_memory()
    if devices:
        dt = Table(title="devices (NVML)")
        for col in ("device", "used", "total", ""):
            dt.add_column(col)
        for name, used, total in devices:
            dt.add_row(name, format_size(used), format_size(total), usage_bar(used, used, total))
        parts.append(dt)
    return Group(*parts)


def render_once(width: int = 140) -> str:
    """One frame as plain text (what `kvtop --once` prints)."""
    console = Console(width=width, record=True, file=None, force_terminal=False, color_system=None)
    with console.capture() as capture:
        console.print(build_frame())
    return capture.get()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtop", description=__doc__,
                                     epilog="examples:\n  kvtop\n  kvtop --interval 0.5\n  kvtop --once",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("-n", "--interval", type=float, default=1.0, help="seconds between frames (default 1)")
    args = parser.parse_args(argv)
    if not 0 < args.interval < float("inf"):
        print("kvtop: --interval must be a number of seconds more than 0", file=sys.stderr)
        return 2
    try:
        budget.reap()
        if args.once:
            Console().print(build_frame())
            return 0
        with Live(build_frame(), refresh_per_second=max(1.0, 1 / args.interval), screen=False) as live:
            while True:
                time.sleep(args.interval)
                budget.reap()
                live.update(build_frame())
    except ShmDirError as exc:
        print(f"kvtop: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

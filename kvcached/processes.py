"""Who still runs: a process's start time from /proc, so liveness survives pid reuse (a pid alone can name a new
process by the time someone checks it). Used by budget records, leases and the prefix store's half-written files."""
from __future__ import annotations


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat); None if gone or a zombie."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: fields after it start past the last ')'.
    try:
        rest = stat_line[stat_line.rindex(b")") + 2:].split()
        return None if rest[0] == b"Z" else int(rest[19])
    except (ValueError, IndexError):
        return None

"""The lab's one clock: `time.monotonic()` seconds for every request and memory sample.

Monotonic time never jumps with NTP or DST and is system-wide on Linux, so a no-op server in another
process, the workload and the memory sampler all stamp events on the same axis. Plots want "seconds since
start" and reports want dates, so a run also keeps the wall-clock epoch of its t=0 (`epoch_at`).
"""
from __future__ import annotations

import time

now = time.monotonic


def epoch_at(monotonic_s: float) -> float:
    """The wall-clock epoch (time.time()) that corresponds to a monotonic instant."""
    return time.time() - (time.monotonic() - monotonic_s)

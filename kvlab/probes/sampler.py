"""The memory sampler: runs the probes of its sources on background threads, one per rate, on the request clock.

Every sample is `(t_s, series, metric, value)` with `t_s = time.monotonic()`, the same clock the workload stamps
requests with, so memory and latency line up without any conversion. Rows go to memory.csv as they come (tidy,
long format) and stay in memory for the caller.

Each source is a set of probes with their own rates: cheap figures (/proc/PID/status, shared-memory records,
NVML device counters) at the sampler's rate, expensive ones (PSS from smaps_rollup, per-process NVML, a
Prometheus scrape) at a low rate. Probes of one rate share a thread, so a 50 ms PSS read never stalls the
100 Hz figures.
"""
from __future__ import annotations

import csv
import threading
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

from kvlab.probes.protocol import Probe, Source

# memory.csv columns, in order.
CSV_COLUMNS = ("t_s", "series", "metric", "value")


class Sample(NamedTuple):
    """One reading. A NamedTuple, not a dataclass: at 100 Hz its construction cost shows in the sampler's CPU."""

    t_s: float
    series: str
    metric: str
    value: float


class MemorySampler:
    """Reads its sources' probes on background threads (one per rate) and keeps/writes every sample.

    >>> with MemorySampler([HostTreeSource("static", server)], out_csv=run_dir / "memory.csv") as sampler:
    ...     run_workload(...)
    >>> sampler.dataframe()
    """

    FLUSH_EVERY_S = 0.25  # memory.csv is flushed at least this often, so a crash loses at most this much

    def __init__(self, sources: Sequence[Source], interval_s: float = 0.01, out_csv: Path | str | None = None) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self.sources = list(sources)
        self.out_csv = Path(out_csv) if out_csv else None
        self._samples: list[Sample] = []
        self._write_lock = threading.Lock()
        self._file = None
        self._writer: Any = None
        self._last_flush = 0.0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cpu_s: dict[str, float] = {}
        self._ticks: dict[float, int] = {}
        self.errors: list[str] = []
        groups: dict[float, list[Probe]] = {}
        for source in self.sources:
            for probe in source.probes():
                rate = probe.interval_s or interval_s
                groups.setdefault(rate, []).append(probe)
        self._groups = groups

    # ---- lifecycle
    def start(self) -> "MemorySampler":
        if self._threads:
            return self
        if self.out_csv:
            new = not self.out_csv.exists() or self.out_csv.stat().st_size == 0
            self.out_csv.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.out_csv, "a", newline="")
            self._writer = csv.writer(self._file)
            if new:
                self._writer.writerow(CSV_COLUMNS)
                self._file.flush()
        self._stop.clear()
        for rate, probes in sorted(self._groups.items()):
            t = threading.Thread(target=self._loop, args=(rate, probes), name=f"kvlab-sampler-{rate:g}s",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def stop(self) -> None:
        """Stop the threads, take one last sample of every probe (so the series end at the stop time), close."""
        if not self._threads:
            return
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []
        self.sample_now()
        with self._write_lock:
            if self._file:
                self._file.close()
                self._file = None
                self._writer = None

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- sampling
    def _take(self, probe: Probe, now: float) -> None:
        try:
            readings = list(probe.read())
        except Exception as exc:  # one broken probe must not end the others' timeline
            if len(self.errors) < 100:
                self.errors.append(f"{type(probe).__name__}: {exc!r}")
            return
        rows = [Sample(now, s, m, v) for s, m, v in readings]
        self._samples.extend(rows)
        with self._write_lock:
            if self._writer is not None:
                self._writer.writerows((r.t_s, r.series, r.metric, r.value) for r in rows)
                if now - self._last_flush >= self.FLUSH_EVERY_S:
                    self._file.flush()
                    self._last_flush = now

    def sample_now(self, include_slow: bool = True) -> None:
        """Read every probe once now (e.g. PSS at a phase boundary), from the calling thread."""
        for rate, probes in self._groups.items():
            if include_slow or rate <= self.interval_s:
                for probe in probes:
                    self._take(probe, time.monotonic())
        with self._write_lock:
            if self._file:
                self._file.flush()

    def _loop(self, rate: float, probes: list[Probe]) -> None:
        # Absolute schedule: tick k at start + k*rate; a slow tick skips the ticks it overran, never bunches up.
        start = time.monotonic()
        k = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for probe in probes:
                    self._take(probe, now)
                self._ticks[rate] = self._ticks.get(rate, 0) + 1
                k = max(k + 1, int((time.monotonic() - start) / rate) + 1)
                delay = max(0.0, start + k * rate - time.monotonic())
                # time.sleep wakes for half the CPU of Event.wait (no lock per wait), which matters at 100 Hz;
                # a fast thread then sees stop() within one tick. Slow probes wait on the event to stop at once.
                if rate < 0.1:
                    time.sleep(delay)
                else:
                    self._stop.wait(delay)
        finally:
            self._cpu_s[threading.current_thread().name] = time.thread_time()

    # ---- results
    def cpu_time_s(self) -> float:
        """CPU seconds the sampler threads have used (running threads are read through their CPU clocks)."""
        total = sum(self._cpu_s.values())
        for t in self._threads:
            if t.name in self._cpu_s or t.ident is None:
                continue
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except (OSError, ProcessLookupError):
                continue
        return total

    def ticks(self) -> dict[float, int]:
        """Ticks done per rate (seconds between ticks -> count)."""
        return dict(self._ticks)

    def samples(self) -> list[Sample]:
        return list(self._samples)

    def dataframe(self) -> Any:
        """The samples as a pandas DataFrame with columns t_s, series, metric, value."""
        import pandas as pd

        return pd.DataFrame([(s.t_s, s.series, s.metric, s.value) for s in self._samples], columns=list(CSV_COLUMNS))

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples())


def read_memory_csv(path: Path | str) -> Any:
    """memory.csv as a DataFrame (empty, with the columns, if the file has no rows)."""
    import pandas as pd

    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(CSV_COLUMNS))
    return pd.read_csv(path)

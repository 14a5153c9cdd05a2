"""Arrival processes: seeded generators of send offsets, in seconds from the start of a workload.

Offsets, not gaps: the workload sends request i at t0 + offset_i on an absolute schedule, so a slow response
or a late wake-up never shifts the requests after it. Every random process takes a seed and gives the same
offsets for it, so a static and a kvcached run see the same traffic.

`gamma` follows vLLM's `benchmarks/serve.py`: gaps ~ Gamma(shape=k, scale=1/(rate*k)), mean 1/rate and
coefficient of variation 1/sqrt(k); k=1 is Poisson, k<1 burstier, k>1 smoother.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import numbers
import random
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Literal, Sequence

ArrivalKind = Literal["constant", "poisson", "gamma", "bursts", "ramp", "trace"]
KINDS: tuple[str, ...] = ("constant", "poisson", "gamma", "bursts", "ramp", "trace")


def _positive(name: str, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_number(what: str, value: object, *, minimum: float, strict: bool, whole: bool = False) -> None:
    """Refuse what would send nothing (a negative count), never end (NaN, infinity) or fail mid-run.
    `what` names the value and its flag, so the message points at the fix."""
    above = f"> {minimum:g}" if strict else f">= {minimum:g}"
    kind = "a whole number" if whole else "a finite number"
    # numbers.Real and Integral, not float and int: numpy's scalars from a notebook are numbers too.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real):
        raise ValueError(f"{what} must be {kind} {above}, got {value!r}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{what} must be {kind} {above}, got {value!r}")


def constant(rate: float) -> Iterator[float]:
    """One request every 1/rate seconds, the first at 0."""
    _positive("rate", rate)
    i = 0
    while True:
        # i / rate, not a running sum: no float drift over a long run.
        yield i / rate
        i += 1


def gamma(rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Gaps drawn from Gamma(shape=burstiness, scale=1/(rate*burstiness)) (vLLM's definition)."""
    _positive("rate", rate)
    _positive("burstiness", burstiness)
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    t = 0.0
    while True:
        t += rng.gammavariate(burstiness, scale)
        yield t


def poisson(rate: float, seed: int = 0) -> Iterator[float]:
    """Poisson process: exponential gaps of mean 1/rate (gamma with burstiness 1)."""
    return gamma(rate, 1.0, seed)


def bursts(size: int, every: float, count: int | None = None) -> Iterator[float]:
    """`size` requests at once at 0, every, 2*every, ...; `count` bursts, or without end."""
    if size <= 0:
        raise ValueError(f"burst size must be >= 1, got {size}")
    _positive("every", every)
    b = 0
    while count is None or b < count:
        for _ in range(size):
            yield b * every
        b += 1


def ramp(start_rate: float, end_rate: float, duration: float) -> Iterator[float]:
    """Evenly spaced requests whose rate moves linearly from start_rate to end_rate over `duration`, then
    holds at end_rate. Request i is sent when the integral of the rate reaches i (deterministic, so a ramp
    shows the rate and not sampling noise)."""
    if start_rate < 0 or end_rate < 0 or start_rate == end_rate == 0:
        raise ValueError("ramp rates must be >= 0 and not both 0")
    _positive("duration", duration)
    slope = (end_rate - start_rate) / duration
    total = (start_rate + end_rate) * duration / 2  # requests sent by the end of the ramp
    i = 0
    while True:
        if i <= total:
            # Solve start*t + slope*t^2/2 = i for t >= 0.
            if abs(slope) < 1e-12:
                t = i / start_rate
            else:
                disc = start_rate * start_rate + 2 * slope * i
                t = (-start_rate + math.sqrt(max(disc, 0.0))) / slope
            yield min(t, duration)
        else:
            if end_rate == 0:
                return
            yield duration + (i - total) / end_rate
        i += 1


@dataclass(frozen=True)
class TraceRow:
    """One request of a trace: when (seconds), and what to send when the trace says."""

    timestamp: float
    prompt: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None


def _trace_number(row: dict, key: str) -> float | None:
    """A number of a trace row (CSV gives text, JSON numbers or text); ValueError says what is wrong."""
    value = row.get(key)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"`{key}` must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"`{key}` must be a finite number, got {value!r}")
    return number


def _trace_count(row: dict, key: str, minimum: int) -> int | None:
    number = _trace_number(row, key)
    if number is not None and number < minimum:
        raise ValueError(f"`{key}` must be >= {minimum}, got {row[key]!r}")
    return None if number is None else int(number)


# BurstGPT's trace columns, read as ours: its CSV can be replayed as it is downloaded.
BURSTGPT_COLUMNS = {"Timestamp": "timestamp", "Request tokens": "prompt_tokens", "Response tokens": "output_tokens"}


def _trace_row(row: object) -> TraceRow:
    if isinstance(row, dict) and "timestamp" not in row and "Timestamp" in row:
        row = {BURSTGPT_COLUMNS.get(k, k): v for k, v in row.items()}
    if not isinstance(row, dict):
        raise ValueError(f"not a JSON object (got {type(row).__name__}); write one object per line, such as "
                         '{"timestamp": 0.5, "prompt_tokens": 128}')
    timestamp = _trace_number(row, "timestamp")
    if timestamp is None:
        raise ValueError("no `timestamp` (columns: timestamp, prompt_tokens or prompt, output_tokens)")
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"`prompt` must be text, got {prompt!r}")
    return TraceRow(timestamp=timestamp, prompt=prompt or None,
                    prompt_tokens=_trace_count(row, "prompt_tokens", 1),
                    output_tokens=_trace_count(row, "output_tokens", 0))


def _numbered_rows(path: Path, f: IO[str]) -> Iterator[tuple[int, object]]:
    """(line number, raw row) of a JSONL or CSV trace; an unreadable line is a ValueError naming it."""
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    reason = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                    raise ValueError(f"{path}:{lineno}: not a JSON object ({reason})") from None
        return
    reader = csv.DictReader(f)
    try:
        for row in reader:
            yield reader.line_num, row  # the line the row ends on: a quoted field may span lines
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: not a CSV row ({e})") from None


def read_trace(path: str | Path) -> list[TraceRow]:
    """Rows of a CSV (with a header) or JSONL trace, sorted by timestamp.

    Columns/keys: `timestamp` (seconds; absolute or relative, only differences matter), `prompt_tokens` or
    `prompt`, and `output_tokens`; BurstGPT's CSV (`Timestamp`, `Request tokens`, `Response tokens`) is read as
    it is. A bad row is a ValueError that names the file and the line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file {path} does not exist")
    rows = []
    try:
        with path.open(encoding="utf-8", newline="") as f:
            for lineno, raw in _numbered_rows(path, f):
                try:
                    rows.append(_trace_row(raw))
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason}): save the trace as UTF-8") from None
    rows.sort(key=lambda row: row.timestamp)
    return rows


def trace_offsets(rows: Sequence[TraceRow]) -> Iterator[float]:
    """Offsets of trace rows relative to the first row."""
    if not rows:
        return
    first = rows[0].timestamp
    for row in rows:
        yield row.timestamp - first


def trace(path: str | Path) -> Iterator[float]:
    """Offsets of a trace file's rows, relative to its first row (see `read_trace`)."""
    return trace_offsets(read_trace(path))


@dataclass(frozen=True)
class ArrivalSpec:
    """An arrival process as plain data (for params.json, CLI flags, notebook parameters)."""

    kind: str = "poisson"
    rate: float | None = None
    burstiness: float = 1.0
    burst_size: int | None = None
    burst_every: float | None = None
    burst_count: int | None = None
    end_rate: float | None = None
    ramp_duration: float | None = None
    trace_path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown arrival {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.kind in ("constant", "poisson", "gamma", "ramp") and self.rate is None:
            raise ValueError(f"arrival {self.kind!r} needs a rate (--rate)")
        if self.kind == "bursts" and (self.burst_size is None or self.burst_every is None):
            raise ValueError("arrival 'bursts' needs --burst-size and --burst-every")
        if self.kind == "ramp" and self.end_rate is None:
            raise ValueError("arrival 'ramp' needs an end rate (--end-rate)")
        if self.kind == "trace" and not self.trace_path:
            raise ValueError("arrival 'trace' needs a file (--trace FILE)")
        # Checked here, not when the generator first runs: a bad number must stop a run before it starts,
        # and a negative burst count or a NaN rate would otherwise send nothing or never end, silently.
        if self.rate is not None:
            _check_number("rate (--rate)", self.rate, minimum=0.0, strict=self.kind != "ramp")
        _check_number("burstiness (--burstiness)", self.burstiness, minimum=0.0, strict=True)
        if self.burst_size is not None:
            _check_number("burst size (--burst-size)", self.burst_size, minimum=1, strict=False, whole=True)
        if self.burst_every is not None:
            _check_number("seconds between bursts (--burst-every)", self.burst_every, minimum=0.0, strict=True)
        if self.burst_count is not None:
            _check_number("burst count (--burst-count)", self.burst_count, minimum=1, strict=False, whole=True)
        if self.end_rate is not None:
            _check_number("end rate (--end-rate)", self.end_rate, minimum=0.0, strict=False)
        if self.ramp_duration is not None:
            _check_number("ramp duration (--ramp-duration)", self.ramp_duration, minimum=0.0, strict=True)
        if self.kind == "ramp" and self.rate == 0 and self.end_rate == 0:
            raise ValueError("a ramp from rate 0 to end rate 0 sends nothing: give --rate or --end-rate above 0")

    def offsets(self, seed: int = 0, duration: float | None = None) -> Iterator[float]:
        """The offsets generator this spec describes. A ramp without its own duration spans `duration`."""
        return from_spec(self, seed=seed, duration=duration)

    def trace_rows(self) -> list[TraceRow] | None:
        return read_trace(self.trace_path) if self.kind == "trace" and self.trace_path else None


def from_spec(spec: ArrivalSpec, seed: int = 0, duration: float | None = None) -> Iterator[float]:
    """Build the generator of offsets for `spec`."""
    if spec.kind == "constant":
        return constant(spec.rate)  # type: ignore[arg-type]
    if spec.kind == "poisson":
        return poisson(spec.rate, seed)  # type: ignore[arg-type]
    if spec.kind == "gamma":
        return gamma(spec.rate, spec.burstiness, seed)  # type: ignore[arg-type]
    if spec.kind == "bursts":
        return bursts(spec.burst_size, spec.burst_every, spec.burst_count)  # type: ignore[arg-type]
    if spec.kind == "ramp":
        span = spec.ramp_duration or duration
        if span is None:
            raise ValueError("a ramp needs a duration: set ramp_duration or the workload duration")
        return ramp(spec.rate, spec.end_rate, span)  # type: ignore[arg-type]
    return trace(spec.trace_path)  # type: ignore[arg-type]


def add_arrival_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--arrival ...` flags shared by kvlab commands."""
    g = parser.add_argument_group("arrivals")
    g.add_argument("--arrival", choices=KINDS, default="poisson", help="arrival process (default poisson)")
    g.add_argument("--rate", type=float, help="requests per second (start rate of a ramp)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape k: 1 = Poisson, <1 burstier, >1 smoother (default 1)")
    g.add_argument("--burst-size", type=int, help="requests per burst (--arrival bursts)")
    g.add_argument("--burst-every", type=float, help="seconds between bursts (--arrival bursts)")
    g.add_argument("--burst-count", type=int, help="number of bursts (default: as many as fit in --duration)")
    g.add_argument("--end-rate", type=float, help="final rate of --arrival ramp")
    g.add_argument("--ramp-duration", type=float, help="seconds of the ramp (default: --duration)")
    g.add_argument("--trace", dest="trace_path", metavar="FILE",
                   help="CSV/JSONL trace: timestamp, prompt_tokens or prompt, output_tokens")


def spec_from_args(args: argparse.Namespace) -> ArrivalSpec:
    """ArrivalSpec from the flags of `add_arrival_arguments` (ValueError names the missing flag)."""
    return ArrivalSpec(kind=args.arrival, rate=args.rate, burstiness=args.burstiness,
                       burst_size=args.burst_size, burst_every=args.burst_every, burst_count=args.burst_count,
                       end_rate=args.end_rate, ramp_duration=args.ramp_duration, trace_path=args.trace_path)

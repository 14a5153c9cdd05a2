"""What happened to each request of a workload (RequestRecord), and requests.csv, where records are kept.

Times are `kvlab.clock.now()` (monotonic) seconds. Rows are appended and flushed as requests finish, so a crash
keeps every request that finished before it.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

STATUSES = ("ok", "error", "timeout")


@dataclass
class RequestRecord:
    """What happened to one request. Times are `kvlab.clock.now()` (monotonic) seconds."""

    series: str
    model: str
    url: str
    request_id: str
    scheduled_s: float
    send_s: float | None = None
    first_token_s: float | None = None
    end_s: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    status: str = "ok"
    http_status: int | None = None
    error: str | None = None
    # The generated text, for checks that compare outputs; kept in memory only (requests.csv holds no text).
    text: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def ttft_s(self) -> float | None:
        """Send to first token chunk (streamed requests only)."""
        if self.send_s is None or self.first_token_s is None:
            return None
        return self.first_token_s - self.send_s

    @property
    def e2e_s(self) -> float | None:
        """Send to the end of the response."""
        if self.send_s is None or self.end_s is None:
            return None
        return self.end_s - self.send_s

    @property
    def tpot_s(self) -> float | None:
        """(e2e - TTFT) / (output_tokens - 1), vLLM's time per output token after the first."""
        ttft, e2e, n = self.ttft_s, self.e2e_s, self.output_tokens
        if ttft is None or e2e is None or n is None or n < 2:
            return None
        return (e2e - ttft) / (n - 1)

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive token chunks (a chunk may hold several tokens)."""
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def send_lag_s(self) -> float | None:
        """How late the client sent it against its schedule (client-side pacing error, plus any wait for
        a concurrency slot)."""
        return None if self.send_s is None else self.send_s - self.scheduled_s


class RecordList(list):
    """The records of a run (a plain list) plus the run's t0 on the monotonic clock and as a wall-clock
    epoch, so plots can show seconds since start."""

    t0_s: float = 0.0
    t0_epoch_s: float = 0.0
    duration_s: float | None = None


RECORD_FIELDS = [f.name for f in fields(RequestRecord) if f.name != "text"]
DERIVED_FIELDS = ["ttft_s", "tpot_s", "e2e_s", "send_lag_s"]
CSV_FIELDS = RECORD_FIELDS + DERIVED_FIELDS


def _row(rec: RequestRecord) -> dict[str, Any]:
    row: dict[str, Any] = {name: getattr(rec, name) for name in RECORD_FIELDS}
    row["chunk_times"] = json.dumps(rec.chunk_times)
    for name in DERIVED_FIELDS:
        row[name] = getattr(rec, name)
    return {k: ("" if v is None else v) for k, v in row.items()}


def append_requests_csv(records: RequestRecord | Iterable[RequestRecord], path: str | Path) -> None:
    """Append rows (header first when the file is new or empty) and flush, so a crash keeps them."""
    if isinstance(records, RequestRecord):
        records = [records]
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for rec in records:
            writer.writerow(_row(rec))
        f.flush()


class RequestsCsvWriter:
    """An `on_record` callback that appends each record to requests.csv and flushes it, keeping the file
    open (a 1000 req/s workload must not reopen a file per request on its event loop).

    >>> with RequestsCsvWriter(run_dir / "requests.csv") as writer:
    ...     run_workload(targets, 60, on_record=writer)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=CSV_FIELDS)
        if new:
            self._writer.writeheader()
            self._file.flush()

    def __call__(self, rec: RequestRecord) -> None:
        self._writer.writerow(_row(rec))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RequestsCsvWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_requests_csv(records: Iterable[RequestRecord], path: str | Path) -> None:
    """requests.csv with one row per record; `chunk_times` is a JSON list column."""
    path = Path(path)
    path.write_text("")
    append_requests_csv(records, path)


_FLOATS = {"scheduled_s", "send_s", "first_token_s", "end_s"}
_INTS = {"prompt_tokens", "output_tokens", "http_status"}


def read_requests_csv(path: str | Path) -> list[RequestRecord]:
    """Records back from requests.csv (derived columns are recomputed, not read)."""
    out = []
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            kw: dict[str, Any] = {}
            for name in RECORD_FIELDS:
                v = row.get(name, "")
                if name == "chunk_times":
                    kw[name] = json.loads(v) if v else []
                elif v == "":
                    kw[name] = None if name not in ("series", "model", "url", "request_id", "status") else ""
                elif name in _FLOATS:
                    kw[name] = float(v)
                elif name in _INTS:
                    kw[name] = int(v)
                else:
                    kw[name] = v
            out.append(RequestRecord(**kw))
    return out

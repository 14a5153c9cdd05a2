"""Execute parameterised notebooks with papermill, each into its own run directory.

A notebook run is an experiment run: `results/<notebook stem>/<run-id>/` receives the executed notebook beside
the data and figures the notebook's kvlab calls write there (the runner passes the directory as the `run_dir`
parameter). Notebooks run on a kernel named "kvlab" that is this very interpreter, so a notebook sees the same
kvlab, vLLM and torch as the command that launched it, whatever other kernels the machine has.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

KERNEL_NAME = "kvlab"
RUN_DIR_PARAMETER = "run_dir"
_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# ---- parameters ---------------------------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """A command-line value as a YAML scalar, like papermill's `-p`: "3" -> 3, "0.5" and "1e3" -> float,
    "true" -> True, "null" -> None, anything else stays a string (a path, a model name)."""
    import yaml

    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)  # YAML 1.1 reads "1e3" as a string; papermill (and people) mean a number
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if value is None and text.strip().lower() not in ("null", "none", "~") else value


def parse_parameters(pairs: Iterable[Sequence[str]] = (), files: Iterable[Path | str] = ()) -> dict[str, Any]:
    """Parameters from YAML files (in order), then `-p KEY VALUE` pairs on top."""
    import yaml

    params: dict[str, Any] = {}
    for f in files:
        path = Path(f)
        if not path.exists():
            raise FileNotFoundError(f"parameters file {path} not found: pass -f with a YAML mapping of names to values")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"parameters file {path} must hold a YAML mapping (key: value lines), "
                             f"got {type(loaded).__name__}")
        params.update(loaded)
    for key, value in pairs:
        params[key] = parse_value(value)
    return params


# ---- kernel -------------------------------------------------------------------------------------------------

def ensure_kernel(name: str = KERNEL_NAME) -> str:
    """Make sure a kernelspec `name` runs this interpreter (sys.executable); install it under sys.prefix if it
    is missing or points elsewhere. Idempotent: a matching spec is left alone."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    def current_argv0() -> str | None:
        try:
            spec = KernelSpecManager().get_kernel_spec(name)
        except NoSuchKernel:
            return None
        return spec.argv[0] if spec.argv else None

    if current_argv0() == sys.executable:
        return name
    import fcntl
    import os

    from ipykernel.kernelspec import install

    # Runs starting together on one node (a sweep) would otherwise remove and copy the same spec at once. The lock
    # sits where the spec goes, inside this environment, which nobody else writes.
    lock_path = Path(sys.prefix) / "share" / "jupyter" / ".kvlab-kernelspec.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600), "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if current_argv0() != sys.executable:
            install(kernel_name=name, display_name=f"Python ({name}: {Path(sys.prefix).name})", prefix=sys.prefix)
    found = current_argv0()
    if found != sys.executable:
        # A user-level spec of the same name shadows the one under sys.prefix.
        raise RuntimeError(f"the Jupyter kernel {name!r} runs {found}, not {sys.executable}: remove the other one "
                           f"with `jupyter kernelspec remove {name}` and run again")
    return name


# ---- failures -----------------------------------------------------------------------------------------------

@dataclass
class CellFailure:
    """Where a notebook failed: the cell's index in the source notebook (papermill's injected parameters cell
    not counted), its first lines, and the error."""

    cell_index: int
    source: str
    ename: str
    evalue: str
    traceback: list[str] = field(default_factory=list)

    def report(self, lines: int = 6) -> str:
        src = self.source.splitlines()
        head = "\n".join(f"    {line}" for line in src[:lines]) + ("\n    ..." if len(src) > lines else "")
        return f"cell {self.cell_index} failed:\n{head}\n  {self.ename}: {self.evalue}"


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _cell_failure(exc: Any, source: Path) -> CellFailure:
    """From papermill's error, whose cell index counts the parameters cell it injected (right after the cell
    tagged `parameters`, or first when there is none): map it back to the source notebook."""
    import nbformat

    index = int(exc.cell_index)
    cells = nbformat.read(str(source), as_version=4).cells
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    injected_at = tagged[0] + 1 if tagged else 0
    if index > injected_at:
        index -= 1
    return CellFailure(cell_index=index, source=str(exc.source), ename=str(exc.ename),
                       evalue=_strip_ansi(str(exc.evalue)), traceback=[_strip_ansi(t) for t in exc.traceback])


# ---- running ------------------------------------------------------------------------------------------------

@dataclass
class NotebookRun:
    """One executed notebook: where it ran and how it ended."""

    notebook: Path
    run_dir: Path
    executed: Path
    parameters: dict[str, Any]
    elapsed_s: float = 0.0
    failure: CellFailure | None = None
    error: str | None = None  # a run that ended without a failing cell (its kernel or its Ray worker died)

    @property
    def ok(self) -> bool:
        return self.failure is None and self.error is None

    @property
    def experiment(self) -> str:
        return self.run_dir.parent.name


def experiment_name(notebook: Path | str) -> str:
    """The run directory's experiment: the notebook's file name without .ipynb."""
    return Path(notebook).stem


def run_notebook(notebook: Path | str, parameters: Mapping[str, Any] | None = None, *,
                 root: Path | str = "results", run_id: str | None = None, kernel_name: str | None = None,
                 progress: bool = True, log_output: bool = False, cwd: Path | str | None = None,
                 start_timeout: float = 120) -> NotebookRun:
    """Execute `notebook` into a fresh `root/<stem>/<run-id>/` with `run_dir` added to its parameters.

    A failing cell does not raise: the returned NotebookRun carries the CellFailure, and the executed
    notebook (with the traceback in its outputs) stays in the run directory."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from kvlab.runs import new_run_id

    source = Path(notebook)
    if not source.is_file():
        raise FileNotFoundError(f"notebook {source} not found: pass a path like notebooks/01_elastic_vs_static.ipynb")
    run_dir = (Path(root) / experiment_name(source) / (run_id or new_run_id())).resolve()
    run_dir.mkdir(parents=True, exist_ok=False)
    executed = run_dir / source.name
    params = {**dict(parameters or {}), RUN_DIR_PARAMETER: str(run_dir)}
    kernel = kernel_name or ensure_kernel()
    result = NotebookRun(notebook=source, run_dir=run_dir, executed=executed, parameters=params)
    started = time.monotonic()
    try:
        papermill.execute_notebook(str(source), str(executed), parameters=params, kernel_name=kernel,
                                   progress_bar=progress, log_output=log_output,
                                   cwd=str(cwd) if cwd is not None else None, start_timeout=start_timeout)
    except PapermillExecutionError as exc:
        result.failure = _cell_failure(exc, source)
        mark_run_failed(run_dir, f"cell {result.failure.cell_index} failed: {result.failure.ename}: "
                                 f"{result.failure.evalue}", result.failure.traceback)
    except BaseException as exc:  # the kernel died, or Ctrl-C: the run did not finish either
        mark_run_failed(run_dir, f"notebook did not finish: {type(exc).__name__}: {exc}")
        raise
    finally:
        result.elapsed_s = time.monotonic() - started
    return result


def mark_run_failed(run_dir: Path | str, error: str, traceback: Sequence[str] = ()) -> bool:
    """Mark the run's summary.json "failed" with `error` if it still says "running".

    A notebook's cells create the Run and finish it in later cells, so a failing cell in between leaves a
    summary that looks in progress forever; this is the runner closing it. A summary the notebook already
    finished or failed is left alone. Returns True when it changed the file."""
    import json

    from kvlab.runs.run import STATUS_FAILED, STATUS_RUNNING, write_json

    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return False  # no run summary (the notebook failed before creating its Run), or not ours to fix
    if not isinstance(summary, dict) or summary.get("status") != STATUS_RUNNING:
        return False
    summary.update(status=STATUS_FAILED, error=error)
    write_json(path, summary)
    error_txt = path.with_name("error.txt")
    if traceback and not error_txt.exists():
        error_txt.write_text("\n".join(traceback) + "\n")
    return True


# ---- reporting ----------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = [
    ("idle_mem_mb", "idle MB", "{:.0f}"), ("peak_mem_mb", "peak MB", "{:.0f}"), ("flex_mb", "flex MB", "{:.0f}"),
    ("idle_savings_mb", "idle saved MB", "{:.0f}"), ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.3f}"), ("latency_p50_s", "lat p50 s", "{:.3f}"),
    ("latency_p99_s", "lat p99 s", "{:.3f}"), ("requests_ok", "ok", "{:.0f}"), ("requests_failed", "failed", "{:.0f}"),
]


def summary_rich_table(run_dir: Path | str, title: str | None = None) -> Any:
    """summary.json of a run as a rich Table (one row per series), or None when the run wrote no summary."""
    import math

    from rich.table import Table

    from kvlab.runs import summary_table

    path = Path(run_dir)
    if not (path / "summary.json").exists():
        return None
    df = summary_table(path)
    if df.empty:
        return None  # a run that failed before any series had figures
    table = Table(title=title or f"{path.parent.name}/{path.name}")
    table.add_column("series")
    # Savings are against the series named "static"; without one they would compare with an arbitrary row.
    skip = set() if "static" in df.index else {"idle_savings_mb", "idle_savings_pct"}
    present = [(k, label, fmt) for k, label, fmt in SUMMARY_COLUMNS
               if k in df and k not in skip and df[k].notna().any()]
    for _, label, _ in present:
        table.add_column(label, justify="right")
    for series, row in df.iterrows():
        cells = []
        for key, _, fmt in present:
            v = row[key]
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(float(v)))
        table.add_row(str(series), *cells)
    return table


def print_report(runs: Sequence[NotebookRun], console: Any = None) -> None:
    """Per run: where it is, how it ended, and its summary table (or the failing cell)."""
    import json

    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or in CI: rich would fold the table into 80 columns
            console = Console(width=160)
    for r in runs:
        status = "ok" if r.ok else "FAILED"
        summary_path = r.run_dir / "summary.json"
        run_status = json.loads(summary_path.read_text()).get("status") if summary_path.exists() else None
        console.print(f"[bold]{r.notebook.name}[/bold] {status} in {r.elapsed_s:.0f} s -> {r.run_dir}"
                      + (f" (summary status: {run_status})" if run_status and run_status != "ok" else ""),
                      highlight=False)
        if not r.ok and r.failure is not None:
            console.print(r.failure.report(), highlight=False, markup=False)
            console.print(f"  executed notebook with the traceback: {r.executed}", highlight=False)
        elif r.error:
            console.print(f"  {r.error}", highlight=False, markup=False)
        table = summary_rich_table(r.run_dir)
        if table is not None:
            console.print(table)
        elif r.ok:
            console.print("  (no summary.json with figures: the notebook wrote no run summary)")


__all__ = ["KERNEL_NAME", "CellFailure", "NotebookRun", "ensure_kernel", "experiment_name", "mark_run_failed",
           "parse_parameters", "parse_value", "print_report", "run_notebook", "summary_rich_table"]

"""One point of a sweep, as it runs where it was placed (a Ray worker, or this process for a local sweep).

A job carries everything the worker needs, so the worker needs no file of the caller's: the notebook's text (not
its path), or the function itself. The run goes to the shared results path when the sweep has one; otherwise to a
staging folder on the worker (`kvlab-sweep-<run-id>` in its temp folder), and comes back as an archive in the
result.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class SweepJob:
    """What one run needs: which point, where its run directory goes, and what to execute there."""

    index: int
    experiment: str
    run_id: str
    params: dict[str, Any]
    notebook_name: str | None = None  # the notebook's file name (the executed copy keeps it)
    notebook_text: str | None = None
    fn: Callable[..., Any] | None = None
    cwd: str | None = None  # the caller's working directory: used when it exists where the run lands
    shared_root: str | None = None  # a results root every node and the caller see; None ships the run back
    kernel_name: str | None = None

    @property
    def label(self) -> str:
        from kvlab.sweeps.grid import point_label

        return f"{self.experiment} [{point_label(self.params)}]" if self.params else self.experiment


@dataclass
class PointResult:
    """How one run ended, as the caller gets it back."""

    index: int
    experiment: str
    run_id: str
    params: dict[str, Any]
    ok: bool
    error: str | None = None  # one line: the failing cell's error, or why the run did not finish
    failure: dict[str, Any] | None = None  # a failing notebook cell (CellFailure's fields)
    node: str = ""
    started_s: float = 0.0  # epoch seconds on the worker
    finished_s: float = 0.0
    archive: bytes | None = field(default=None, repr=False)
    run_dir: str | None = None  # where the run directory is now (on the caller, once gathered)

    @property
    def elapsed_s(self) -> float:
        return max(0.0, self.finished_s - self.started_s)


def _run_notebook(job: SweepJob, root: Path, cwd: str | None) -> tuple[str | None, dict[str, Any] | None]:
    from dataclasses import asdict

    from kvlab.notebooks.runner import run_notebook

    assert job.notebook_name is not None and job.notebook_text is not None
    with tempfile.TemporaryDirectory(prefix="kvlab-notebook-") as tmp:
        source = Path(tmp) / job.notebook_name
        source.write_text(job.notebook_text)
        result = run_notebook(source, job.params, root=root, run_id=job.run_id, kernel_name=job.kernel_name,
                              progress=False, cwd=cwd)
    if result.failure is None:
        return None, None
    f = result.failure
    return f"cell {f.cell_index} failed: {f.ename}: {f.evalue}", asdict(f)


def _run_function(job: SweepJob, run_dir: Path, cwd: str | None) -> str | None:
    from kvlab.notebooks.runner import mark_run_failed

    assert job.fn is not None
    run_dir.mkdir(parents=True, exist_ok=False)
    here = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        job.fn(**job.params, run_dir=str(run_dir))
    except Exception as e:  # the run failed; a KeyboardInterrupt or SystemExit still stops the worker
        error = f"{type(e).__name__}: {e}"
        lines = "".join(traceback.format_exception(e)).splitlines()
        mark_run_failed(run_dir, error, lines)
        if not (run_dir / "error.txt").exists():
            (run_dir / "error.txt").write_text("\n".join(lines) + "\n")
        return error
    finally:
        os.chdir(here)
    return None


def staging_dir(run_id: str) -> Path:
    """Where a run that ships back writes on its worker: named after the run, so a run whose worker died can be
    found on its node."""
    return Path(tempfile.gettempdir()) / f"kvlab-sweep-{run_id}"


def execute(job: SweepJob) -> PointResult:
    """Run the job and report how it ended; a failing run is a result, never an exception. A run cancelled midway
    (Ctrl-C on the caller) leaves its staging folder on the worker."""
    from kvlab.sweeps.archive import pack_run_dir

    cwd = job.cwd if job.cwd and Path(job.cwd).is_dir() else None
    staging = None if job.shared_root else staging_dir(job.run_id)
    root = Path(job.shared_root) if job.shared_root else staging
    assert root is not None
    run_dir = root / job.experiment / job.run_id
    result = PointResult(index=job.index, experiment=job.experiment, run_id=job.run_id, params=job.params, ok=False,
                         node=_node_name(), started_s=time.time())
    try:
        if staging is not None:
            staging.mkdir(mode=0o700)
        if job.notebook_text is not None:
            result.error, result.failure = _run_notebook(job, root, cwd)
        else:
            result.error = _run_function(job, run_dir, cwd)
        result.ok = result.error is None
    except Exception as e:  # the kernel died, a notebook that is not JSON, a run directory that exists
        result.error = f"{type(e).__name__}: {e}"
    result.finished_s = time.time()
    if run_dir.is_dir():
        if staging is not None:
            result.archive = pack_run_dir(run_dir)
        else:
            result.run_dir = str(run_dir)
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _node_name() -> str:
    """The host name, with Ray's node id when the run is a Ray task (containers on two machines can share a name)."""
    host = socket.gethostname()
    ray = sys.modules.get("ray")  # a Ray worker has imported it; a local sweep need not pay for the import
    try:
        if ray is not None and ray.is_initialized():
            return f"{host} ({ray.get_runtime_context().get_node_id()[:12]})"
    except Exception:  # not inside a task after all: the host name alone
        pass
    return host


__all__ = ["PointResult", "SweepJob", "execute"]

"""A sweep from start to end: points -> jobs -> runs (here or on Ray) -> one results tree -> an index and a table.

Layout under the results root:
    <root>/<experiment>/<run-id>/          each run's directory, as any single run writes it
    <root>/sweeps/<sweep-id>/sweep.json    the sweep: where it ran, and per run its point, node, time and status
    <root>/sweeps/<sweep-id>/summary.csv   one row per (run, series): the point's parameters beside the figures
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kvlab.sweeps.backends import RayCluster, Resources, SweepError, parse_on, resources_for, run_device, run_local
from kvlab.sweeps.grid import point_label
from kvlab.sweeps.work import PointResult, SweepJob


@dataclass
class SweepOutcome:
    """Every run of a sweep, gathered, in point order."""

    sweep_id: str
    on: str
    results: list[PointResult]
    index_dir: Path
    wall_s: float
    resources: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[PointResult]:
        return [r for r in self.results if not r.ok]


def function_experiment(fn: Any) -> str:
    """A function's runs go under its name (`elastic_vs_static`); a lambda's or a partial's under "sweep"."""
    name = getattr(fn, "__name__", "")
    return name if name.isidentifier() else "sweep"


def _jobs_for(target: Any, points: Sequence[Mapping[str, Any]], run_ids: Sequence[str], *, shared_root: str | None,
              kernel_name: str | None, first_index: int = 0) -> list[SweepJob]:
    """One job per point for one notebook (read here, shipped as text) or one function."""
    common = {"cwd": os.getcwd(), "shared_root": shared_root, "kernel_name": kernel_name}
    if callable(target):
        experiment = function_experiment(target)
        return [SweepJob(index=first_index + i, experiment=experiment, run_id=rid, params=dict(p), fn=target,
                         **common) for i, (p, rid) in enumerate(zip(points, run_ids))]
    from kvlab.notebooks.runner import experiment_name

    path = Path(target)
    if not path.is_file():
        raise SweepError(f"notebook {path} not found: pass a path like notebooks/01_elastic_vs_static.ipynb")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SweepError(f"cannot read notebook {path}: {e}") from None
    return [SweepJob(index=first_index + i, experiment=experiment_name(path), run_id=rid, params=dict(p),
                     notebook_name=path.name, notebook_text=text, **common)
            for i, (p, rid) in enumerate(zip(points, run_ids))]


def check_notebook_parameters(notebook: Path | str, names: Sequence[str]) -> None:
    """A swept or set name the notebook does not declare is a typo: papermill would only warn and run the
    defaults, which on a cluster costs every run."""
    import papermill

    try:
        declared = set(papermill.inspect_notebook(str(notebook)))
    except (OSError, ValueError) as e:  # not JSON, not a notebook, not UTF-8
        raise SweepError(f"{notebook} is not a readable notebook: {e}") from None
    unknown = sorted(set(names) - declared)
    if unknown:
        raise SweepError(f"{Path(notebook).name} has no parameter {', '.join(map(repr, unknown))}; its parameters: "
                         f"{', '.join(sorted(declared)) or 'none (no cell tagged parameters)'}")


def _fresh_run_ids(count: int, experiment_dir: Path) -> list[str]:
    """Run ids picked here, before any run starts: distinct, and new to the tree the runs land in."""
    from kvlab.runs import new_run_id

    ids: list[str] = []
    while len(ids) < count:
        rid = new_run_id()
        if rid not in ids and not (experiment_dir / rid).exists():
            ids.append(rid)
    return ids


def gather(result: PointResult, root: Path) -> PointResult:
    """Put a returned run directory into the caller's results tree (a run on a shared path is there already)."""
    from kvlab.sweeps.archive import ArchiveError, unpack_run_dir

    if result.archive is not None:
        dest = root / result.experiment / result.run_id
        try:
            unpack_run_dir(result.archive, dest)
            result.run_dir = str(dest.resolve())
        except (ArchiveError, OSError) as e:  # a hostile archive, a run id taken meanwhile, a full disk
            result.ok = False
            result.error = f"{result.error + '; ' if result.error else ''}its run directory did not come back: {e}"
        result.archive = None
    return result


def _progress_line(r: PointResult, done: int, total: int) -> str:
    head = f"[{done}/{total}] {'ok' if r.ok else 'FAILED'} {r.experiment}"
    point = f" ({point_label(r.params)})" if r.params else ""
    where = f" on {r.node}" if r.node else ""
    line = f"{head}{point}{where} in {r.elapsed_s:.0f} s" + (f" -> {r.run_dir}" if r.run_dir else "")
    if not r.ok:
        line += f"\n    {r.error}"
    return line


def _write_index(outcome: SweepOutcome, root: Path, target_names: Sequence[str]) -> None:
    from kvlab.runs.run import write_json

    outcome.index_dir.mkdir(parents=True, exist_ok=True)
    write_json(outcome.index_dir / "sweep.json", {
        "sweep_id": outcome.sweep_id, "on": outcome.on, "targets": list(target_names), "wall_s": outcome.wall_s,
        "resources_per_run": outcome.resources, "root": str(root.resolve()),
        "runs": [{"index": r.index, "experiment": r.experiment, "run_id": r.run_id, "params": r.params, "ok": r.ok,
                  "error": r.error, "failure": r.failure, "node": r.node, "started_s": r.started_s,
                  "finished_s": r.finished_s, "elapsed_s": r.elapsed_s, "run_dir": r.run_dir}
                 for r in outcome.results]})
    table = sweep_table(outcome.results)
    table.to_csv(outcome.index_dir / "summary.csv", index=False)


def sweep_table(results: Sequence[PointResult]) -> Any:
    """One row per (run, series): the point's parameters, where and how the run went, and compare()'s figures.
    A run with no figures (it failed early) still has its row."""
    import pandas as pd

    from kvlab.runs import compare

    rows = []
    for r in results:
        base = {**r.params, "experiment": r.experiment, "run_id": r.run_id, "ok": r.ok, "error": r.error,
                "node": r.node, "elapsed_s": round(r.elapsed_s, 1), "run_dir": r.run_dir}
        figures = None
        if r.run_dir and (Path(r.run_dir) / "summary.json").is_file():
            try:
                figures = compare(r.run_dir)
            except (OSError, ValueError) as e:
                base["error"] = base["error"] or f"summary.json unreadable: {e}"
        if figures is None or figures.empty:
            rows.append(base)
            continue
        for _, row in figures.drop(columns=["run"]).iterrows():
            rows.append({**base, **row.to_dict()})
    return pd.DataFrame(rows)


def run_sweep(targets: Sequence[Any], points: Sequence[Mapping[str, Any]], *, on: str | None = None,
              root: Path | str = "results", shared_root: Path | str | None = None, kernel_name: str | None = None,
              gpus_per_run: float | None = None, cpus_per_run: float | None = None,
              memory_per_run: int | None = None, runtime_env: dict[str, Any] | None = None, progress: bool = True,
              local_cpus: int | None = None) -> SweepOutcome:
    """Run every target (a notebook path or a function taking `run_dir=`) at every point and gather the runs."""
    from kvlab.runs import new_run_id

    on = parse_on(on)
    root = Path(root)
    shared = str(Path(shared_root).resolve()) if shared_root is not None else None
    if shared is not None and on is None:
        raise SweepError("--shared-root is for runs on Ray; a local sweep writes to --root")
    for target in targets:
        if not callable(target):
            check_notebook_parameters(target, sorted({k for p in points for k in p}))
    jobs: list[SweepJob] = []
    for target in targets:
        name = function_experiment(target) if callable(target) else Path(target).stem
        ids = _fresh_run_ids(len(points), Path(shared or root) / str(name))
        jobs += _jobs_for(target, points, ids, shared_root=shared if on else str(root.resolve()),
                          kernel_name=kernel_name, first_index=len(jobs))
    # Every figure is checked before Ray starts: a typo costs nothing.
    for device in ("cpu", "cuda"):
        resources_for(device, gpus=gpus_per_run, cpus=cpus_per_run, memory=memory_per_run)
    sweep_id = new_run_id()
    started = time.monotonic()
    results: list[PointResult] = []
    asks: list[Resources] = []
    outcome = SweepOutcome(sweep_id=sweep_id, on=on or "local", results=results, index_dir=root / "sweeps" / sweep_id,
                           wall_s=0.0)
    cluster = RayCluster(on, runtime_env=runtime_env, local_cpus=local_cpus) if on else None
    stream = None
    try:
        if cluster is not None:
            gpu = cluster.has_gpu()
            asks = [resources_for(run_device(j.params, gpu), gpus=gpus_per_run, cpus=cpus_per_run,
                                  memory=memory_per_run) for j in jobs]
            cluster.check_fits(asks)
            stream = cluster.run(jobs, asks)
        else:
            stream = run_local(jobs)
        _collect(stream, results, len(jobs), root, progress)
    finally:
        # Also on Ctrl-C or a fault: the runs still going are cancelled, and the index records every run, the
        # finished ones with their results and the others as not finished.
        if stream is not None:
            stream.close()
        if cluster is not None:
            cluster.close()
        if stream is not None:
            _add_unfinished(results, jobs)
            outcome.results = sorted(results, key=lambda r: r.index)
            outcome.wall_s = time.monotonic() - started
            outcome.resources = sorted({a.describe() for a in asks})
            _write_index(outcome, root, [function_experiment(t) if callable(t) else str(t) for t in targets])
    return outcome


def _add_unfinished(results: list[PointResult], jobs: Sequence[SweepJob]) -> None:
    from kvlab.sweeps.work import staging_dir

    finished = {r.index for r in results}
    for job in jobs:
        if job.index not in finished:
            where = (Path(job.shared_root) / job.experiment / job.run_id if job.shared_root
                     else f"{staging_dir(job.run_id)} on its node, if it started")
            results.append(PointResult(index=job.index, experiment=job.experiment, run_id=job.run_id,
                                       params=job.params, ok=False,
                                       error=f"cancelled before it finished (what it wrote is in {where})"))


def _collect(stream: Any, results: list[PointResult], total: int, root: Path, progress: bool) -> None:
    """Gather results into `results` as they come: one bar for the sweep, a line per finished run."""
    from tqdm import tqdm

    with tqdm(total=total, desc="sweep", unit="run", file=sys.stderr, disable=not progress, dynamic_ncols=True) \
            as bar:
        for result in stream:
            results.append(gather(result, root))
            line = _progress_line(result, len(results), total)
            bar.write(line, file=sys.stderr)  # a disabled bar still writes (--no-progress drops only the bar)
            bar.update(1)


__all__ = ["SweepOutcome", "check_notebook_parameters", "gather", "run_sweep", "sweep_table"]

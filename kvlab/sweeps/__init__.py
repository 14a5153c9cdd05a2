"""Sweeps: one notebook or experiment function over a grid of parameters, run here one after another or spread
over a Ray cluster, every run directory gathered into one results tree with an index (docs/sweeps.md).

    kvlab.sweep("notebooks/01_elastic_vs_static.ipynb", {"burst_size": [8, 16]}, on="ray")
    kvlab run notebooks/01_elastic_vs_static.ipynb --sweep burst_size=8,16 --on ray

Modules: `grid` (points), `work` (one run where it is placed), `archive` (a run directory shipped back),
`backends` (this process, or Ray), `driver` (the whole sweep, its index and table).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


def sweep(target: str | Path | Callable[..., Any], grid: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
          *, on: str = "local", root: str | Path = "results", shared_root: str | Path | None = None,
          gpus_per_run: float | None = None, cpus_per_run: float | None = None, memory_per_run: int | str | None = None,
          runtime_env: dict[str, Any] | None = None, progress: bool = True) -> Any:
    """Run `target` at every point of `grid` and return a DataFrame: one row per (run, series) with the point's
    parameters, the node, the status and the run's figures (as `kvlab.compare` gives them).

    target: a notebook path (executed with papermill) or a function called as `fn(**point, run_dir=DIR)` that
        writes its run there (kvlab's experiments do: `kvlab.elastic_vs_static`).
    grid: {"name": [values...]} (a scalar is fixed for every point), or a list of point dicts.
    on: "local" (here, one after another), "ray" (a local Ray cluster, or $RAY_ADDRESS), or "ray://HOST:PORT".
    shared_root: a results path every node sees (runs write there); without it each run ships back to `root`.
    gpus_per_run, cpus_per_run, memory_per_run (bytes, or "8G"): what each Ray task asks for; by default a GPU
        run asks for 1 GPU and 1 CPU, a CPU run (vLLM's CPU build) for 1 CPU and 4 GiB.
    runtime_env: Ray's runtime environment for the tasks (for example {"pip": [...]}) when the workers lack kvlab.

    The sweep's index is `<root>/sweeps/<sweep-id>/sweep.json` beside `summary.csv`; `table.attrs["sweep_dir"]`
    names it. Compare the runs with `kvlab.compare(*table["run_dir"].dropna().unique())`.
    """
    from kvcached.units import parse_size
    from kvlab.sweeps.driver import run_sweep, sweep_table
    from kvlab.sweeps.grid import expand_grid

    if isinstance(memory_per_run, str):  # "8G", as on the command line
        memory_per_run = parse_size(memory_per_run)
    outcome = run_sweep([target], expand_grid(grid), on=on, root=root, shared_root=shared_root,
                        gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run, memory_per_run=memory_per_run,
                        runtime_env=runtime_env, progress=progress)
    table = sweep_table(outcome.results)
    table.attrs["sweep_dir"] = str(outcome.index_dir)
    return table


__all__ = ["sweep"]

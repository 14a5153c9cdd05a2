"""`kvlab run NOTEBOOK...`: execute notebooks with papermill, each into results/<notebook stem>/<run-id>/."""
from __future__ import annotations

import argparse
import sys

EPILOG = """\
sweeps:
  --sweep burst_size=8,16 --sweep max_tokens=32,64     four runs, one per point of the grid
  ... --on ray                 each run a Ray task: on a local Ray cluster, or the one $RAY_ADDRESS names
  ... --on ray://HEAD:10001    through a Ray client address
  Runs on Ray come back into --root (or stay on --shared-root, a path every node sees); the sweep's index is
  <root>/sweeps/<sweep-id>/sweep.json with summary.csv beside it. docs/sweeps.md shows a multi-node set-up.
"""


def _size(text: str) -> int:
    from kvcached.units import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _amount(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="execute notebooks with papermill into run directories and print their summaries",
        description=__doc__ + " The executed notebook lands beside the run's data and figures; the notebook "
        "gets the directory as its `run_dir` parameter.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="+", metavar="NOTEBOOK", help="notebook(s) to execute, in order")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="set a parameter; VALUE is read as a YAML scalar (3, 0.5, true, cuda)")
    p.add_argument("-f", "--parameters-file", action="append", default=[], metavar="FILE",
                   help="YAML file of parameters (applied before -p)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=v1,v2",
                   help="run once per value; several --sweep flags make a grid")
    p.add_argument("--on", metavar="WHERE", default=None,
                   help="where the runs execute: local (default: here, one after another), ray (a local Ray "
                        "cluster, or $RAY_ADDRESS), or ray://HOST:PORT (a Ray client address)")
    p.add_argument("--root", default="results", help="where run directories go (default: results)")
    p.add_argument("--shared-root", metavar="PATH",
                   help="with --on ray: a results path every node sees; runs write there instead of shipping back")
    p.add_argument("--gpus-per-run", type=_amount, metavar="N",
                   help="with --on ray: GPUs each run asks for (default: 1 when the run is on a GPU, else 0)")
    p.add_argument("--cpus-per-run", type=_amount, metavar="N", help="with --on ray: CPUs each run asks for "
                                                                       "(default: 1); a CPU run's engines compute "
                                                                       "on that many threads, unpinned")
    p.add_argument("--memory-per-run", type=_size, metavar="SIZE",
                   help="with --on ray: memory each run asks for, like 8G (default: 4G for a CPU run, none on GPU)")
    p.add_argument("--kernel", help="Jupyter kernel to use (default: a 'kvlab' kernel running this Python, "
                                    "registered on first use)")
    p.add_argument("--log-output", action="store_true", help="echo the notebook's cell outputs while it runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvlab.notebooks.runner import parse_parameters, print_report, run_notebook
    from kvlab.sweeps.backends import SweepError, parse_on
    from kvlab.sweeps.grid import GridError, check_name, parse_sweeps

    try:
        params = parse_parameters(args.parameter, args.parameters_file)
        for key in params:
            check_name(key)
        sweeps = parse_sweeps(args.sweep)
        on = parse_on(args.on)
    except (ValueError, FileNotFoundError, GridError, SweepError) as e:
        print(f"kvlab run: {e}", file=sys.stderr)
        return 2
    missing = [nb for nb in args.notebooks if not Path(nb).is_file()]
    if missing:
        print(f"kvlab run: notebook not found: {', '.join(missing)} (pass paths like notebooks/NAME.ipynb)",
              file=sys.stderr)
        return 2
    ray_only = [flag for flag, value in (("--shared-root", args.shared_root), ("--gpus-per-run", args.gpus_per_run),
                                         ("--cpus-per-run", args.cpus_per_run),
                                         ("--memory-per-run", args.memory_per_run)) if value is not None]
    if on is None and ray_only:
        print(f"kvlab run: {', '.join(ray_only)} apply to runs on Ray: add --on ray", file=sys.stderr)
        return 2
    if on is not None:
        return _run_on_ray(args, on, params, sweeps)
    runs = []
    total = len(args.notebooks) * len(sweeps)
    for nb in args.notebooks:
        for point in sweeps:
            label = f" ({', '.join(f'{k}={v}' for k, v in point.items())})" if point else ""
            print(f"[{len(runs) + 1}/{total}] {nb}{label}", file=sys.stderr)
            result = run_notebook(nb, {**params, **point}, root=args.root, kernel_name=args.kernel,
                                  progress=not args.no_progress, log_output=args.log_output)
            if not result.ok and result.failure is not None:
                print(f"{nb}: {result.failure.report()}", file=sys.stderr)
            runs.append(result)
    print_report(runs)
    failed = [r for r in runs if not r.ok]
    if failed:
        print(f"kvlab run: {len(failed)} of {len(runs)} notebook run(s) failed", file=sys.stderr)
        return 1
    return 0


def _run_on_ray(args: argparse.Namespace, on: str, params: dict, sweeps: list[dict]) -> int:
    """Every (notebook, point) as a Ray task; runs gathered into --root, then the same report as a local run."""
    from pathlib import Path

    from kvlab.notebooks.runner import CellFailure, NotebookRun, print_report
    from kvlab.sweeps.backends import SweepError
    from kvlab.sweeps.driver import run_sweep

    if args.log_output:
        print("kvlab run: --log-output is ignored on Ray (cell outputs stay in each executed notebook)",
              file=sys.stderr)
    try:
        outcome = run_sweep(args.notebooks, [{**params, **point} for point in sweeps], on=on, root=args.root,
                            shared_root=args.shared_root, kernel_name=args.kernel, gpus_per_run=args.gpus_per_run,
                            cpus_per_run=args.cpus_per_run, memory_per_run=args.memory_per_run,
                            progress=not args.no_progress)
    except SweepError as e:
        print(f"kvlab run: {e}", file=sys.stderr)
        return 2
    runs = []
    for r in outcome.results:
        notebook = next(Path(nb) for nb in args.notebooks if Path(nb).stem == r.experiment)
        run_dir = Path(r.run_dir) if r.run_dir else Path(args.root) / r.experiment / r.run_id
        failure = CellFailure(**r.failure) if r.failure else None
        runs.append(NotebookRun(notebook=notebook, run_dir=run_dir, executed=run_dir / notebook.name,
                                parameters=r.params, elapsed_s=r.elapsed_s, failure=failure,
                                error=None if r.ok or failure else r.error))
    print_report(runs)
    print(f"sweep of {len(runs)} run(s) on {outcome.on} in {outcome.wall_s:.0f} s "
          f"(each asked for {', '.join(outcome.resources)}); index: {outcome.index_dir / 'sweep.json'}",
          file=sys.stderr)
    if outcome.failed:
        print(f"kvlab run: {len(outcome.failed)} of {len(runs)} run(s) failed", file=sys.stderr)
        return 1
    return 0

"""`kvlab run NOTEBOOK...`: execute notebooks with papermill, each into results/<notebook stem>/<run-id>/."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="execute notebooks with papermill into run directories and print their summaries",
        description=__doc__ + " The executed notebook lands beside the run's data and figures; the notebook "
        "gets the directory as its `run_dir` parameter.")
    p.add_argument("notebooks", nargs="+", metavar="NOTEBOOK", help="notebook(s) to execute, in order")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="set a parameter; VALUE is read as a YAML scalar (3, 0.5, true, cuda)")
    p.add_argument("-f", "--parameters-file", action="append", default=[], metavar="FILE",
                   help="YAML file of parameters (applied before -p)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=v1,v2",
                   help="run once per value; several --sweep flags make a grid")
    p.add_argument("--root", default="results", help="where run directories go (default: results)")
    p.add_argument("--kernel", help="Jupyter kernel to use (default: a 'kvlab' kernel running this Python, "
                                    "registered on first use)")
    p.add_argument("--log-output", action="store_true", help="echo the notebook's cell outputs while it runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvlab.notebooks.runner import parse_parameters, parse_sweeps, print_report, run_notebook

    try:
        params = parse_parameters(args.parameter, args.parameters_file)
        sweeps = parse_sweeps(args.sweep)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvlab run: {e}", file=sys.stderr)
        return 2
    missing = [nb for nb in args.notebooks if not Path(nb).is_file()]
    if missing:
        print(f"kvlab run: notebook not found: {', '.join(missing)} (pass paths like notebooks/NAME.ipynb)",
              file=sys.stderr)
        return 2
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

"""The `kvlab` command: one module per subcommand in kvlab/commands/, each with `register(subparsers)`.

Subcommand modules are imported only when listed here, and each imports its heavy dependencies
inside its handler, so `kvlab --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order `kvlab --help` shows.
SUBCOMMAND_MODULES = [
    "kvlab.commands.tiny_model",
    "kvlab.commands.bench",
    "kvlab.commands.load",
    "kvlab.commands.serve",
    "kvlab.commands.router",
    "kvlab.commands.run",
    "kvlab.commands.doctor",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvlab",
        description="kvlab: launch vLLM servers (static or kvcached), drive workloads, "
        "sample memory on the request clock, and write tidy results.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

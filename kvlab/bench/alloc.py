"""Map/unmap cost of kvcached pages through the budgeted allocator, against first-touch memset in the same run.

The benchmark itself is kvcached's (`python -m kvcached.bench`); this is its `kvlab bench alloc` entry.
"""
from __future__ import annotations

import argparse

from kvcached.bench import add_arguments, measure, print_table
from kvlab.bench import report

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    return report("alloc", lambda: measure(args.backend, args.duration, args.pages, args.device), print_table,
                  args.json)

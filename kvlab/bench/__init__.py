"""Benchmarks behind `kvlab bench NAME`: each measures its target against a baseline in the same run."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

MEASUREMENT_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, OSError, MemoryError)


def report(name: str, measure: Callable[[], dict[str, Any]], print_table: Callable[[dict[str, Any]], None],
           as_json: bool, errors: tuple[type[BaseException], ...] = MEASUREMENT_ERRORS) -> int:
    """Run one measurement and print it as a table, or as JSON with `--json`; a failure is one line on stderr."""
    try:
        result = measure()
    except errors as exc:
        print(f"kvlab bench {name}: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0

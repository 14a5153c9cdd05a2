"""Benchmarks behind `kvlab bench NAME`: each measures its target against a baseline in the same run."""
from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path(".cache") / "models" / "tiny-llama"
MODEL_HELP = f"model path (default: {DEFAULT_MODEL}, generated into a temp dir if missing)"

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


def write_and_print(result: dict[str, Any], path: Path, as_json: bool,
                    print_table: Callable[[dict[str, Any]], None]) -> int:
    """Write a benchmark's figures to `path` (in its run directory), then print them as JSON or as its table."""
    path.write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


def model_path(arg: str | None, purpose: str = "bench") -> str:
    """The model a vLLM benchmark serves: `arg`, else the tiny model `make setup` generates, else a fresh one."""
    if arg:
        if not (Path(arg) / "config.json").exists() and Path(arg).exists():
            raise ValueError(f"{arg} has no config.json: generate one with `kvlab tiny-model {arg}`")
        return arg
    if (DEFAULT_MODEL / "config.json").exists():
        return str(DEFAULT_MODEL)
    from kvlab.tiny_model import write_tiny_model

    out = Path(tempfile.mkdtemp(prefix=f"kvlab-{purpose}-")) / "tiny-llama"
    write_tiny_model(out)
    return str(out)

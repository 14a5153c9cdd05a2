#!/usr/bin/env python3
"""Strip outputs and execution counts from notebooks before they are committed.

Committed notebooks are sources: outputs belong to a run directory (`kvlab run` saves the executed copy there),
and in git they would only bloat diffs and go stale. `--check` exits 1 listing notebooks that still carry any.

    python scripts/strip_notebooks.py notebooks/*.ipynb
    python scripts/strip_notebooks.py --check notebooks/*.ipynb
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

# Metadata a run leaves on cells (papermill timings, Jupyter's collapse state): never part of the source.
VOLATILE_CELL_METADATA = ("execution", "papermill", "collapsed", "scrolled")


def strip(nb: nbformat.NotebookNode) -> bool:
    """Strip `nb` in place; True if anything changed."""
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code":
            if cell.get("outputs"):
                cell.outputs = []
                changed = True
            if cell.get("execution_count") is not None:
                cell.execution_count = None
                changed = True
        for key in VOLATILE_CELL_METADATA:
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
    if "papermill" in nb.metadata:
        del nb.metadata["papermill"]
        changed = True
    return changed


def has_outputs(nb: nbformat.NotebookNode) -> bool:
    return any(c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None) for c in nb.cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook has outputs")
    args = parser.parse_args(argv)
    dirty = []
    for path in args.notebooks:
        nb = nbformat.read(str(path), as_version=4)
        if args.check:
            if has_outputs(nb):
                dirty.append(path)
        elif strip(nb):
            nbformat.write(nb, str(path))
            print(f"stripped {path}")
    if dirty:
        print("notebooks with outputs (run scripts/strip_notebooks.py on them): "
              + ", ".join(map(str, dirty)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

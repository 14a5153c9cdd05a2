"""Throwaway notebooks for the runner's and the sweeps' tests (a kernel start costs about a second)."""
from __future__ import annotations

from pathlib import Path

import nbformat


def make_notebook(path: Path, *cells: tuple[str, str], parameters: str = "x = 1\nrun_dir = None") -> Path:
    """A notebook at `path`: a cell tagged `parameters`, then ("code"|"md", source) cells in order."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                           for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path

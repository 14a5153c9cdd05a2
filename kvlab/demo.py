"""`python -m kvlab.demo`: start one real vLLM server, send a few completions, stop it.

The README's first command runs this (through `make demo`) until the full experiment exists. With no
GPU it serves the tiny offline model (generated on first use); on an NVIDIA GPU it serves a real small
model.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TINY_MODEL = Path(".cache/models/tiny-llama")
GPU_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
PROMPTS = [
    "The capital of France is",
    "Once upon a time,",
    "An elastic KV cache",
]


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
    parser = argparse.ArgumentParser(prog="python -m kvlab.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model to serve (default: the tiny model, or a small real one on GPU)")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    from kvlab.errors import ServerError
    from kvlab.server import VLLMServer

    gpu = has_nvidia_gpu()
    model = args.model or (GPU_MODEL if gpu else str(tiny_model_dir()))
    # On CPU the KV pool is host memory: keep it small; on GPU vLLM sizes it from free memory.
    kv_cache_gib = None if gpu else 1
    print(f"kvlab demo: serving {model} on {'GPU' if gpu else 'CPU'} with vLLM (static KV cache)")
    started = time.monotonic()
    try:
        with VLLMServer(model, kv_cache_gib=kv_cache_gib, enforce_eager=True, name="demo") as server:
            print(f"ready at {server.url} after {server.startup_s:.1f} s "
                  f"(processes: {len(server.pids())}, log: {server.log_path})")
            for prompt in PROMPTS:
                text = server.complete(prompt, max_tokens=args.max_tokens)
                print(f"  {prompt!r} -> {text!r}")
            reply = server.chat("Tell me a story.", max_tokens=args.max_tokens)
            print(f"  chat 'Tell me a story.' -> {reply!r}")
    except ServerError as e:
        print(f"kvlab demo failed: {e}", file=sys.stderr)
        return 1
    print(f"stopped; total {time.monotonic() - started:.1f} s"
          + ("" if gpu else " (random weights: the text is gibberish by design)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

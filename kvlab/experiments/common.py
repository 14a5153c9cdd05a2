"""What every experiment shares: the device choice, series names, burst schedules and a wait that notices a crash."""
from __future__ import annotations

import time
from typing import Protocol, Sequence

GIB = 1 << 30


class Checkable(Protocol):
    """A server, a colocation's server or a router fleet: `check()` raises if it has died."""

    def check(self) -> None: ...


def resolve_device(device: str = "auto") -> str:
    """"cuda" when NVML sees a GPU, else "cpu" (for "auto"); other values pass through after a check."""
    from kvlab.probes import NvmlSource

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device != "auto":
        return device
    return "cuda" if NvmlSource().available else "cpu"


def gpu_share_args(device: str, engines: int, args: Sequence[str]) -> list[str]:
    """`args`, plus `--gpu-memory-utilization` splitting vLLM's default 0.9 between `engines` engines on one GPU
    when `args` sets none. Every vLLM engine checks at start that its share of the GPU is free, so with the default
    the second engine on a GPU refuses to start; with the KV pool set in bytes, that check is all the share does."""
    args = list(args)
    if device == "cuda" and engines > 1 and not any(a.startswith("--gpu-memory-utilization") for a in args):
        args += ["--gpu-memory-utilization", f"{0.9 / engines:.2f}"]
    return args


def short_name(model: str) -> str:
    """A series name for a model: the last path component ("Qwen2.5-0.5B-Instruct", "tiny-llama")."""
    return str(model).rstrip("/").rsplit("/", 1)[-1]


def series_names(models: Sequence[str]) -> list[str]:
    """Distinct series names for the models (the same model twice becomes name-0, name-1)."""
    names = [short_name(m) for m in models]
    if len(set(names)) == len(names):
        return names
    return [f"{n}-{i}" for i, n in enumerate(names)]


def alternating_offsets(n_models: int, index: int, *, rounds: int, burst_size: int, gap_s: float) -> list[float]:
    """Send times of model `index`: round r (every `gap_s` seconds) is a burst of `burst_size` requests to
    model r mod n."""
    return [r * gap_s for r in range(rounds) if r % n_models == index for _ in range(burst_size)]


def wait_alive(seconds: float, *watched: Checkable) -> None:
    """Wait, checking every half second that everything watched is still alive, so a crash ends the experiment
    early with its log instead of after a long wait."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(0.5, left))
        for item in watched:
            item.check()

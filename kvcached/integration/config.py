"""What the environment asks of kvcached inside an engine: on/off, the budget group, the instance and pool names.

Every vLLM process (API server, EngineCore, workers) reads the same variables, so the scheduler and the worker of
one server agree on the pool file without exchanging a message. The API server process, which loads the plugin
first, fixes the instance name in the environment; the processes it spawns inherit it.
"""
from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

TRUE_VALUES = {"1", "true", "yes", "on"}
SUPPORTED_VLLM = ("0.32",)  # major.minor series whose internals the patches were written and tested against
DEFAULT_PAGE_SIZE = 2 << 20  # the CUDA VMM granularity on current GPUs; the host backend uses the same size


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUE_VALUES


def kvcached_enabled() -> bool:
    """`ENABLE_KVCACHED=true|1`. `KVCACHED_AUTOPATCH=1` is accepted but does not switch kvcached on by itself."""
    return _flag("ENABLE_KVCACHED")


def shm_dir() -> Path:
    return Path(os.environ.get("KVCACHED_SHM_DIR", "/dev/shm/kvcached"))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]


@dataclass(frozen=True)
class EngineSettings:
    instance: str  # unique per server; names the budget record and the pool file
    group: str  # KVCACHED_IPC_NAME: instances with the same group share one budget
    page_size: int
    backend: str  # "host" or "cuda"

    def pool_path(self, rank: int = 0) -> Path:
        suffix = "" if rank == 0 else f".rank{rank}"
        return shm_dir() / f"{self.instance}{suffix}.pool"


def settle_instance_env() -> None:
    """Fix the instance and group names in this process's environment, once, before vLLM spawns its processes."""
    if not os.environ.get("KVCACHED_INSTANCE"):
        base = os.environ.get("KVCACHED_INSTANCE_NAME") or f"vllm-{os.getpid()}"
        os.environ["KVCACHED_INSTANCE"] = f"{_safe(base)}-{secrets.token_hex(3)}"
    if not os.environ.get("KVCACHED_IPC_NAME"):
        # By default each server is its own group, so it shares a budget with nobody.
        os.environ["KVCACHED_IPC_NAME"] = os.environ["KVCACHED_INSTANCE"]


def engine_settings(device_type: str) -> EngineSettings:
    settle_instance_env()
    page_size = int(os.environ.get("KVCACHED_PAGE_SIZE", DEFAULT_PAGE_SIZE))
    return EngineSettings(
        instance=os.environ["KVCACHED_INSTANCE"],
        group=os.environ["KVCACHED_IPC_NAME"],
        page_size=page_size,
        backend="cuda" if device_type == "cuda" else "host",
    )

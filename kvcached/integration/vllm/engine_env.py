"""What the environment asks of kvcached inside a vLLM engine: on/off, the engine's name, its budget group.

Every vLLM process (API server, EngineCore, workers) reads the same variables, so the scheduler and the worker of
one server agree on the pool file without exchanging a message. The API server process, which loads the plugin
first, fixes the engine's name in the environment; the processes it spawns inherit it.

Names: the *engine name* (`KVCACHED_INSTANCE`, unique per server) names the engine's budget record (a kvcached
"instance" in `kvctl list`) and its pool file; `KVCACHED_INSTANCE_NAME` is the readable prefix a launcher asks for.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from kvcached.shm import flag, sanitize_name, shm_dir

DEFAULT_PAGE_SIZE = 2 << 20  # the CUDA VMM granularity on current GPUs; the host backend uses the same size
ENGINE_NAME_ENV = "KVCACHED_INSTANCE"
NAME_PREFIX_ENV = "KVCACHED_INSTANCE_NAME"
GROUP_ENV = "KVCACHED_IPC_NAME"


def kvcached_enabled() -> bool:
    """`ENABLE_KVCACHED=true|1`. `KVCACHED_AUTOPATCH=1` is accepted but does not switch kvcached on by itself."""
    return flag("ENABLE_KVCACHED")


@dataclass(frozen=True)
class EngineSettings:
    engine_name: str  # unique per server; names the budget record and the pool file
    group: str  # KVCACHED_IPC_NAME: engines with the same group share one budget
    page_size: int
    backend: str  # "host" or "cuda"

    def pool_path(self, rank: int = 0) -> Path:
        suffix = "" if rank == 0 else f".rank{rank}"
        return shm_dir() / f"{self.engine_name}{suffix}.pool"


def settle_engine_env() -> None:
    """Fix the engine name and group in this process's environment, once, before vLLM spawns its processes."""
    if not os.environ.get(ENGINE_NAME_ENV):
        base = os.environ.get(NAME_PREFIX_ENV) or f"vllm-{os.getpid()}"
        os.environ[ENGINE_NAME_ENV] = f"{sanitize_name(base)[:80]}-{secrets.token_hex(3)}"
    if not os.environ.get(GROUP_ENV):
        # By default each server is its own group, so it shares a budget with nobody.
        os.environ[GROUP_ENV] = os.environ[ENGINE_NAME_ENV]


def engine_settings(device_type: str) -> EngineSettings:
    settle_engine_env()
    page_size = int(os.environ.get("KVCACHED_PAGE_SIZE", DEFAULT_PAGE_SIZE))
    return EngineSettings(
        engine_name=os.environ[ENGINE_NAME_ENV],
        group=os.environ[GROUP_ENV],
        page_size=page_size,
        backend="cuda" if device_type == "cuda" else "host",
    )

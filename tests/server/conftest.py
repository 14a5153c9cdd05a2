"""Shared fixtures of the server tier: the tiny model and one static vLLM-CPU server for the session.

A vLLM-CPU start costs about a minute of CPU on 2 cores (three processes import vLLM), so tests share the session
server wherever they only read from it, and start their own (through `start_server`, which always stops it) only
when they must.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from kvlab.engines.server import VLLMServer

REPO_ROOT = Path(__file__).resolve().parents[2]
# Small pool: enough for the tests' requests, cheap in host memory.
TEST_KV_CACHE_GIB = 0.5

# Every engine of the tier (pytest's, the notebooks' kernels', Ray's workers': they inherit the environment) runs its
# worker inside the EngineCore (vLLM's uniprocess executor): one process fewer to start and import vLLM in (measured
# here: ready in 14 s instead of 20). kvcached then maps through the worker's own region, as on a GPU; the modules
# that test its cross-process path (vLLM-CPU's default) ask for that with `engine_environment`.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
CROSS_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


@contextmanager
def engine_environment(**values: str) -> Iterator[None]:
    """Engines started inside see these variables (a module's fixture wraps its tests in it)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def cross_process_engines() -> Iterator[None]:
    """Engines started in this module run vLLM-CPU's default: scheduler and worker in two processes."""
    with engine_environment(**CROSS_PROCESS):
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bootstrap's tiny model (or $KVLAB_TINY_MODEL); generated into a temp dir when it is missing."""
    path = Path(os.environ.get("KVLAB_TINY_MODEL", REPO_ROOT / ".cache" / "models" / "tiny-llama"))
    if (path / "config.json").exists():
        return path
    from kvlab.tiny_model import write_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    write_tiny_model(out)
    return out


@pytest.fixture(scope="session")
def server_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def static_server(tiny_model_dir: Path, server_log_dir: Path) -> Iterator[VLLMServer]:
    """One static (ENABLE_KVCACHED=false) server on the tiny model, shared by the whole session. It runs vLLM-CPU's
    default processes, as the kvcached servers it is measured against (memory per process tree) do."""
    server = VLLMServer(str(tiny_model_dir), kv_cache_gib=TEST_KV_CACHE_GIB, enforce_eager=True,
                        name="static-session", log_dir=server_log_dir, progress=False,
                        env=CROSS_PROCESS)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def start_server(tiny_model_dir: Path, server_log_dir: Path) -> Iterator[Callable[..., VLLMServer]]:
    """Factory: `start_server(**VLLMServer kwargs)` builds (and by default starts) a server on the tiny
    model with test defaults; every server it made is stopped at teardown, even after a failure."""
    made: list[VLLMServer] = []

    def factory(start: bool = True, **kwargs: Any) -> VLLMServer:
        kwargs.setdefault("model", str(tiny_model_dir))
        kwargs.setdefault("kv_cache_gib", TEST_KV_CACHE_GIB)
        kwargs.setdefault("log_dir", server_log_dir)
        kwargs.setdefault("progress", False)
        server = VLLMServer(**kwargs)
        made.append(server)
        return server.start() if start else server

    yield factory
    for server in made:
        server.stop()


# The tier runs two files at a time (scripts/run_tests.sh), each file whole on one worker, handed out in collection
# order: the longest files go first, so the last minutes are not one long file running alone. Measured here.
LONGEST_FIRST = ("test_notebooks.py", "test_sweep_on_ray.py", "test_kvcached_vllm.py", "test_server_lifecycle.py",
                 "test_router_server.py", "test_prefix_sharing.py", "test_kvcached_full_tmpfs.py",
                 "test_elastic_experiment.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file

"""The engines of a fleet file, started one after another under supervision, stoppable and restartable.

Each instance is a VLLMServer (kvlab.engines.launcher underneath: no orphans even if we are SIGKILLed), with one log
file per instance in the fleet's log directory. Start-ups run in sequence because parallel ones fight for the
same cores (and, on a GPU, for the memory each engine measures at start).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvlab.engines.errors import ServerError
from kvlab.engines.fleet_config import EngineConfig, FleetConfig, FleetConfigError
from kvlab.engines.ports import free_port
from kvlab.engines.server import VLLMServer
from kvlab.router.app import Router
from kvlab.router.backends import Backend, ProcessControl

log = logging.getLogger("kvlab.engines.fleet")
SGLANG_MODULE = "sglang.launch_server"


class SGLangServer(VLLMServer):
    """An SGLang server under the same supervision; it answers GET /v1/models when ready, as vLLM does."""

    def command(self) -> list[str]:
        return [self.python, "-m", SGLANG_MODULE, "--model-path", self.model, "--host", self.host,
                "--port", str(self.port), *self.args]


def _python_has(python: str, module: str) -> bool:
    if python == sys.executable:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    probe = subprocess.run([python, "-c", f"import {module.split('.')[0]}"], capture_output=True)
    return probe.returncode == 0


class SupervisedEngine:
    """One instance of the fleet; the router's ProcessControl for it (pids, stop, start again)."""

    def __init__(self, config: FleetConfig, inst: EngineConfig, log_dir: Path, progress: bool = True) -> None:
        self.config = config
        self.inst = inst
        python = str(Path(inst.venv_path) / "bin" / "python") if inst.venv_path else None
        env = config.environment(inst)
        kvcached = config.uses_kvcached(inst)
        if kvcached:
            # The stats endpoint tells the router which budget records are this engine's (its `kv` sleep level).
            env.setdefault("VLLM_PLUGINS", "kvcached,kvcached_stats")
            env.setdefault("KVCACHED_INSTANCE_NAME", inst.name)
        cls = SGLangServer if inst.engine == "sglang" else VLLMServer
        self.server = cls(inst.model, port=inst.port, host=inst.host, args=inst.engine_args, env=env,
                          kvcached=kvcached, ipc_name=env.get("KVCACHED_IPC_NAME"), log_dir=log_dir,
                          name=inst.name, python=python, progress=progress, prefix_store=inst.prefix_store,
                          prefix_store_max_bytes=inst.prefix_store_max_bytes)
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.server.url

    def check_engine(self) -> None:
        python = self.server.python
        if self.inst.engine == "sglang" and not _python_has(python, SGLANG_MODULE):
            raise FleetConfigError(f"instance {self.inst.name!r} asks for engine sglang, which is not installed in "
                                   f"{python}: `pip install sglang` there, set venv_path, or use engine: vllm")
        if self.inst.engine == "vllm" and not _python_has(python, "vllm"):
            raise FleetConfigError(f"vLLM not found for instance {self.inst.name!r} in {python}: run `make setup` "
                                   "or activate .venv, or set venv_path")

    def pids(self) -> list[int]:
        return self.server.pids()

    def start(self) -> None:
        with self._lock:
            if not self.server.is_running():
                self.server.start(wait=True)

    def stop(self) -> None:
        with self._lock:
            self.server.stop()


class Fleet:
    """Every instance of a fleet file; a context manager that leaves no engine behind."""

    def __init__(self, config: FleetConfig, log_dir: Path | str, progress: bool = True) -> None:
        self.config = config
        self.log_dir = Path(log_dir)
        self.engines: list[SupervisedEngine] = []
        for inst in config.instances:
            if inst.port is None:
                # The router needs the port before the engine starts; pick it now and keep it across restarts.
                inst = _with_port(inst, free_port(inst.host))
            self.engines.append(SupervisedEngine(config, inst, self.log_dir, progress))

    def check(self) -> None:
        for instance in self.engines:
            instance.check_engine()

    def start(self) -> "Fleet":
        """Start each instance and wait for it before the next; on any failure stop those already up."""
        self.check()
        try:
            for i, instance in enumerate(self.engines):
                if i and self.config.launch_delay_seconds:
                    time.sleep(self.config.launch_delay_seconds)
                log.info("starting %s (%s) on %s, log %s", instance.inst.name, instance.inst.model, instance.url,
                         self.log_dir / f"{instance.inst.name}.log")
                instance.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for instance in reversed(self.engines):
            try:
                instance.stop()
            except Exception as e:  # keep stopping the others
                log.error("stopping %s failed: %s", instance.inst.name, e)

    def backends(self) -> list[Backend]:
        return [backend_of(self.config, engine.inst, process=engine) for engine in self.engines]

    def router(self) -> Router:
        """The router in front of these engines, with the fleet file's router and sleep settings."""
        return Router(self.backends(), self.config.router, self.config.sleep_manager)

    def pids(self) -> list[int]:
        return [pid for instance in self.engines for pid in instance.server.pids(include_launcher=True)]

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def backend_of(config: FleetConfig, inst: EngineConfig, process: ProcessControl | None = None) -> Backend:
    """What the router needs to know of one engine of the fleet (and, under `kvlab serve`, its process)."""
    return Backend(name=inst.name, model=inst.served_model_name, url=inst.url, engine=inst.engine,
                   kvcached=config.uses_kvcached(inst), sleep_mode=inst.sleep_mode_enabled,
                   sleep_level=inst.sleep_level or config.sleep_manager.sleep_level, process=process)


def use_fleet_shm_dir(config: FleetConfig) -> None:
    """The `kv` sleep level changes the engines' budget records: read them where the engines write them."""
    dirs = {config.environment(i).get("KVCACHED_SHM_DIR") for i in config.instances if config.uses_kvcached(i)}
    dirs.discard(None)
    if len(dirs) > 1:
        log.warning("instances use different KVCACHED_SHM_DIR values %s: the kv sleep level sees only %s",
                    sorted(d for d in dirs if d), sorted(dirs)[0])
    if dirs:
        os.environ["KVCACHED_SHM_DIR"] = sorted(d for d in dirs if d)[0]


def _with_port(inst: EngineConfig, port: int) -> EngineConfig:
    from dataclasses import replace

    return replace(inst, port=port)


__all__ = ["Fleet", "SupervisedEngine", "SGLangServer", "ServerError", "backend_of", "use_fleet_shm_dir"]

"""The engines of a fleet file, started one after another under supervision, stoppable and restartable.

Each instance is a VLLMServer (kvlab.launcher underneath: no orphans even if we are SIGKILLed), with one log
file per instance in the fleet's log directory. Start-ups run in sequence because parallel ones fight for the
same cores (and, on a GPU, for the memory each engine measures at start).
"""
from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvlab.errors import ServerError
from kvlab.fleet_config import FleetConfig, FleetConfigError, InstanceConfig
from kvlab.router.backends import Backend
from kvlab.server import VLLMServer, free_port

log = logging.getLogger("kvlab.fleet")
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


class SupervisedInstance:
    """One instance of the fleet; the router's ProcessControl for it (pids, stop, start again)."""

    def __init__(self, config: FleetConfig, inst: InstanceConfig, log_dir: Path, progress: bool = True) -> None:
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
                          name=inst.name, python=python, progress=progress)
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
        self.instances: list[SupervisedInstance] = []
        for inst in config.instances:
            if inst.port is None:
                # The router needs the port before the engine starts; pick it now and keep it across restarts.
                inst = _with_port(inst, free_port(inst.host))
            self.instances.append(SupervisedInstance(config, inst, self.log_dir, progress))

    def check(self) -> None:
        for instance in self.instances:
            instance.check_engine()

    def start(self) -> "Fleet":
        """Start each instance and wait for it before the next; on any failure stop those already up."""
        self.check()
        try:
            for i, instance in enumerate(self.instances):
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
        for instance in reversed(self.instances):
            try:
                instance.stop()
            except Exception as e:  # keep stopping the others
                log.error("stopping %s failed: %s", instance.inst.name, e)

    def backends(self) -> list[Backend]:
        return [Backend.from_instance(self.config, instance.inst, process=instance) for instance in self.instances]

    def pids(self) -> list[int]:
        return [pid for instance in self.instances for pid in instance.server.pids(include_launcher=True)]

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _with_port(inst: InstanceConfig, port: int) -> InstanceConfig:
    from dataclasses import replace

    return replace(inst, port=port)


__all__ = ["Fleet", "SupervisedInstance", "SGLangServer", "ServerError"]

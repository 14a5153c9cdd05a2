"""VLLMServer: one vLLM OpenAI-compatible server as a Python object that cannot leak processes.

The server runs under kvlab.engines.launcher, which kills the server's whole process group (API server, EngineCore,
workers) when this Python process dies, even by SIGKILL. A finalizer stops it at normal interpreter exit.
kvlab talks to it over HTTP only; it never imports vLLM.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Mapping, Sequence

from kvcached.shm import sanitize_name
from kvlab.engines.errors import Diagnosis, ServerError
from kvlab.engines.ports import free_port, port_in_use
from kvlab.load import client

GiB = 1 << 30
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"

EXTRA_ARGS_ENV = "KVLAB_VLLM_ARGS"


def engine_args_from_env() -> list[str]:
    """vLLM arguments for every engine kvlab starts, from $KVLAB_VLLM_ARGS (split as a shell would), before each
    server's own arguments so those win: `--dtype float32` for outputs that do not depend on how requests were
    batched on a CPU, `--max-model-len 2048` for every engine a notebook starts."""
    raw = os.environ.get(EXTRA_ARGS_ENV, "")
    try:
        return shlex.split(raw)
    except ValueError as exc:
        raise ValueError(f"{EXTRA_ARGS_ENV}={raw!r} is not an argument list ({exc}): quote it as a shell would, "
                         f"e.g. {EXTRA_ARGS_ENV}='--dtype float32'") from None


def set_aside_log(path: Path) -> Path | None:
    """Rename an earlier run's log to NAME.1.log, NAME.2.log... (the first free number), so a restart of the same
    server (the router's `stop` sleep level wakes it this way) keeps the log of the run before. None if no log."""
    if not path.exists():
        return None
    n = 1
    while (older := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.rename(older)
    return older


def _kill_tree(launcher: subprocess.Popen, timeout: float) -> None:
    """Stop a launcher and everything under it: SIGTERM first (the launcher passes it on to the server's
    group), then SIGKILL for whatever is left after `timeout`. Safe to call more than once."""
    import psutil

    try:
        tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    if launcher.poll() is None:
        try:
            launcher.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    try:
        launcher.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class VLLMServer:
    """A vLLM server process tree, started under kvlab.engines.launcher.

    >>> with VLLMServer(".cache/models/tiny-llama", kv_cache_gib=0.5) as server:
    ...     server.complete("Hello")

    `prefix_store` (a store name, or a directory shared with other machines) makes the server share prompt-prefix
    KV with every engine on that store, through kvcached's KV connector; `prefix_store_max_bytes` caps the store.
    """

    def __init__(self, model: str, *, port: int | None = None, host: str = "127.0.0.1",
                 args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 kvcached: bool = False, ipc_name: str | None = None,
                 enforce_eager: bool = True, kv_cache_gib: float | None = None,
                 log_dir: Path | str | None = None, name: str | None = None,
                 startup_timeout: float = 600, python: str | None = None,
                 progress: bool = True, prefix_store: str | None = None,
                 prefix_store_max_bytes: int | None = None) -> None:
        self.model = str(model)
        self.host = host
        self._port = port
        self.args = [str(a) for a in args]
        self.extra_env = dict(env or {})
        self.kvcached = kvcached
        self.ipc_name = ipc_name
        self.enforce_eager = enforce_eager
        self.kv_cache_gib = kv_cache_gib
        if prefix_store is not None and (not isinstance(prefix_store, str) or not prefix_store.strip()):
            raise ValueError(f"prefix_store must be a store name or a directory, got {prefix_store!r}")
        if prefix_store_max_bytes is not None and (isinstance(prefix_store_max_bytes, bool)
                                                   or not isinstance(prefix_store_max_bytes, int)
                                                   or prefix_store_max_bytes < 0):
            raise ValueError(f"prefix_store_max_bytes must be a whole number of bytes, got {prefix_store_max_bytes!r}")
        self.prefix_store = prefix_store
        self.prefix_store_max_bytes = prefix_store_max_bytes
        self.name = name or f"{Path(self.model.rstrip('/')).name}-{'kvcached' if kvcached else 'static'}"
        # The engine's exact kvcached name (its budget record in `kvctl list`): fixed here, so probes, the router's
        # sleep and cleanup find it by name, never by a prefix another engine's name could share. It survives
        # restarts (a `stop` sleep), whose new record takes the same name once the old process is gone.
        self.kvcached_name = str(self.extra_env.get("KVCACHED_INSTANCE") or
                                 f"{sanitize_name(self.name)[:80]}-{secrets.token_hex(3)}")
        self.log_dir = Path(log_dir) if log_dir else None
        self.startup_timeout = startup_timeout
        self.python = python or sys.executable
        self.progress = progress
        self.startup_s: float | None = None
        self.log_path: Path | None = None
        self._launcher: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self._started_at = 0.0

    # ---- identity --------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            self._port = free_port(self.host)
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (for openai.OpenAI(base_url=...))."""
        return self.url + "/v1"

    @property
    def model_name(self) -> str:
        """The name requests must use: --served-model-name if given, else the model as passed."""
        for i, arg in enumerate(self.args):
            if arg == "--served-model-name" and i + 1 < len(self.args):
                return self.args[i + 1]
            if arg.startswith("--served-model-name="):
                return arg.split("=", 1)[1]
        return self.model

    @property
    def launcher_pid(self) -> int | None:
        return self._launcher.pid if self._launcher else None

    @property
    def pid(self) -> int | None:
        """PID of the vLLM API server (the launcher's only child), None before start or after exit."""
        import psutil

        if not self._launcher:
            return None
        deadline = time.monotonic() + 5
        while True:
            try:
                children = psutil.Process(self._launcher.pid).children()
            except psutil.NoSuchProcess:
                return None
            if children:
                return children[0].pid
            if self._launcher.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def pids(self, include_launcher: bool = False) -> list[int]:
        """The server's process tree (API server, EngineCore, workers...), for memory probes."""
        import psutil

        if not self._launcher:
            return []
        try:
            root = psutil.Process(self._launcher.pid)
            tree = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return ([root.pid] if include_launcher else []) + [p.pid for p in tree]

    def is_running(self) -> bool:
        return self._launcher is not None and self._launcher.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"VLLMServer(name={self.name!r}, model={self.model!r}, url={self.url!r}, {state})"

    # ---- lifecycle -------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The vLLM command line (without the launcher)."""
        cmd = [self.python, "-m", API_SERVER_MODULE, "--model", self.model,
               "--host", self.host, "--port", str(self.port)]
        if self.enforce_eager and "--enforce-eager" not in self.args:
            cmd.append("--enforce-eager")
        if self.kv_cache_gib is not None:
            # The flag works on every platform and takes fractions; VLLM_CPU_KVCACHE_SPACE (set too, for
            # whole GiB, see environment()) is CPU-only and whole GiB only.
            cmd += ["--kv-cache-memory-bytes", str(int(self.kv_cache_gib * GiB))]
        if self.prefix_store is not None:
            cmd += ["--kv-transfer-config", json.dumps(self.kv_transfer_config())]
        return cmd + engine_args_from_env() + self.args

    def kv_transfer_config(self) -> dict:
        """vLLM's --kv-transfer-config for the prefix store (the interface contract's form)."""
        extra: dict = {"store": self.prefix_store}
        if self.prefix_store_max_bytes is not None:
            extra["max_bytes"] = self.prefix_store_max_bytes
        return {"kv_connector": "KVCachedPrefixConnector",
                "kv_connector_module_path": "kvcached.integration.vllm_prefix_connector",
                "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}

    def environment(self) -> dict[str, str]:
        """The server's environment: ours, plus offline mode for local models, plus the kvcached switch."""
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # the log file is the progress bar's status line
        if Path(self.model).is_dir():
            env.setdefault("HF_HUB_OFFLINE", "1")
            env.setdefault("TRANSFORMERS_OFFLINE", "1")
        if self.kv_cache_gib is not None:
            if float(self.kv_cache_gib).is_integer():
                env["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.kv_cache_gib))
            else:
                env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # vLLM-CPU would let it override the flag
        if self.kvcached:
            env["ENABLE_KVCACHED"] = "true"
            if self.ipc_name is None:
                self.ipc_name = f"kvlab-{os.getpid()}-{self.port}"
            env["KVCACHED_IPC_NAME"] = self.ipc_name
            # kvcached's record (kvctl list, kvtop) is named after the server, exactly.
            env["KVCACHED_INSTANCE_NAME"] = self.name
            env["KVCACHED_INSTANCE"] = self.kvcached_name
            # Endpoint plugins load only when named, and naming one restricts the general plugins too.
            env.setdefault("VLLM_PLUGINS", "kvcached,kvcached_stats")
        else:
            env["ENABLE_KVCACHED"] = "false"
            env.pop("KVCACHED_INSTANCE", None)  # never inherit another engine's name from this process
        if self.prefix_store is not None:
            # vLLM-CPU keeps one more core away from its workers for any KV connector (NIXL's transfer thread). The
            # prefix connector copies inside the step and needs none: the same cores as an engine without it, so a
            # fleet's engines run the same threads and give the same greedy outputs.
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
        env.update(self.extra_env)
        return env

    def start(self, wait: bool = True) -> "VLLMServer":
        """Launch the server; with wait=True, block until it answers (or raise ServerError)."""
        if self.is_running():
            return self
        if self._port is not None and port_in_use(self._port, self.host):
            raise ServerError(
                f"cannot start {self.name}: port {self._port} on {self.host} is already in use",
                diagnosis=Diagnosis("port already in use",
                                    "choose another port, or leave port=None to pick a free one"))
        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="kvlab-server-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}.log"
        set_aside_log(self.log_path)
        env = self.environment()
        cmd = [sys.executable, "-m", "kvlab.engines.launcher", "--parent-pid", str(os.getpid()), "--"] + self.command()
        with open(self.log_path, "wb") as log:
            log.write(f"# kvlab: {shlex.join(self.command())}\n".encode())
            log.flush()
            # A session of its own: a Ctrl-C in the launching terminal reaches us, and we stop it cleanly.
            self._launcher = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._started_at = time.monotonic()
        self._finalizer = weakref.finalize(self, _kill_tree, self._launcher, 30.0)
        if wait:
            try:
                self.wait_ready(self.startup_timeout)
            except BaseException:
                # A failed or interrupted (Ctrl-C) start-up must not leave a half-started server behind.
                self.stop(timeout=10)
                raise
        return self

    @property
    def engine_dtype(self) -> str | None:
        """The dtype vLLM chose for the model (from its engine config line: a T4 has no bfloat16, so vLLM falls back
        to float16 there by itself); None before start-up has logged it."""
        match = re.search(r"dtype=torch\.(\w+)", self.read_log())
        return match.group(1) if match else None

    def read_log(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def _status_line(self) -> str:
        lines = [ln for ln in self.read_log()[-4000:].splitlines() if ln.strip()]
        if not lines:
            return ""
        line = re.sub(r"^\(\w+ pid=\d+\)\s*", "", lines[-1])
        line = re.sub(r"^(INFO|WARNING|DEBUG)\s+\S+\s+\S+\s+", "", line)
        return line[:80]

    def _died(self, what: str) -> ServerError:
        rc = self._launcher.poll() if self._launcher else None
        return ServerError(f"vLLM server {self.name} {what}", log_text=self.read_log(),
                           log_path=self.log_path, returncode=rc)

    def wait_ready(self, timeout: float | None = None) -> float:
        """Poll GET /v1/models until it answers; return start-up seconds. ServerError if it dies first."""
        from tqdm.auto import tqdm

        if not self._launcher:
            raise RuntimeError(f"{self.name} was not started: call .start() first")
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        bar = tqdm(desc=f"starting {self.name}", bar_format="{desc} [{elapsed}] {postfix}",
                   disable=not self.progress, leave=False, mininterval=1.0)
        status = ""
        try:
            while True:
                if self._launcher.poll() is not None:
                    raise self._died("exited during start-up")
                if client.is_ready(self.url, timeout=2.0):
                    break
                if time.monotonic() > deadline:
                    err = self._died(f"not ready after {timeout:.0f} s")
                    self.stop()
                    raise err
                if self.progress and (line := self._status_line()) != status:
                    status = line
                    bar.set_postfix_str(status, refresh=False)
                bar.update(0)
                time.sleep(0.5)
        finally:
            bar.close()
        self.startup_s = time.monotonic() - self._started_at
        return self.startup_s

    def check(self) -> None:
        """Raise ServerError (with the log's diagnosis) if the server has died."""
        if self._launcher and self._launcher.poll() is not None:
            raise self._died("is not running")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the whole tree, SIGKILL what is left after `timeout` s. Idempotent."""
        if self._launcher is None:
            return
        _kill_tree(self._launcher, timeout)
        if self._finalizer:
            self._finalizer.detach()
        if self.kvcached:
            # An engine stopped by signal may not get to close its kvcached record: reap what the dead left.
            from kvcached.budget import reap

            reap()

    def __enter__(self) -> "VLLMServer":
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- requests --------------------------------------------------------------------------------------
    def kvcached_stats(self) -> dict:
        """`GET /kvcached/stats`: the server's kvcached used/reserved/limit bytes (kvcached servers only)."""
        if not self.kvcached:
            raise ValueError(f"{self.name} runs a static KV cache: start it with kvcached=True for kvcached stats")
        return client.get_json(f"{self.url}/kvcached/stats")

    def complete(self, prompt: str, max_tokens: int = 16, temperature: float = 0.0) -> str:
        """One completion; ServerError (with the cause) if the server has died."""
        try:
            return client.complete(self.url, self.model_name, prompt, max_tokens, temperature)
        except (OSError, client.HTTPStatusError) as e:
            self._raise_if_dying(e)
            raise

    def chat(self, messages: Sequence[dict] | str, max_tokens: int = 16, temperature: float = 0.0) -> str:
        """One chat completion; a string is sent as a single user message."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        try:
            return client.chat(self.url, self.model_name, messages, max_tokens, temperature)
        except (OSError, client.HTTPStatusError) as e:
            self._raise_if_dying(e)
            raise

    def _raise_if_dying(self, error: Exception, grace: float = 10.0) -> None:
        """After a failed request: if the server exits within `grace` s (vLLM answers 500, then shuts down
        when its engine died), raise ServerError with the log's cause instead of the bare HTTP error."""
        if self._launcher is None or (isinstance(error, client.HTTPStatusError) and error.status < 500):
            return  # the request was at fault, not the server
        try:
            self._launcher.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return
        raise self._died("died")

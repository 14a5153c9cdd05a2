"""Fleet YAML parsing: the controller's format is accepted, and every mistake gets a message naming key and fix."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from kvlab.cli import main
from kvlab.engines.fleet_config import FleetConfigError, load_fleet_config, parse_fleet_config

REPO = Path(__file__).resolve().parents[2]


def parse(data: dict, **kw):
    return parse_fleet_config(data, check_ports=kw.pop("check_ports", False), **kw)


def test_controller_format_is_accepted():
    config = parse({
        "kvcached": {"kvcached_log_level": "INFO", "kvcached_sanity_check": False},
        "router": {"enable_router": True, "router_port": 8080, "router_host": "localhost"},
        "sleep_manager": {"idle_threshold_seconds": 300, "check_interval_seconds": 60, "auto_sleep_enabled": False,
                          "wakeup_on_request": True, "min_sleep_duration": 80},
        "launch_delay_seconds": 5,
        "instances": [
            {"name": "llama", "model": "meta-llama/Llama-3.2-1B", "engine": "vllm", "using_venv": False,
             "kvcached_env": ["ENABLE_KVCACHED=true", "KVCACHED_IPC_NAME=CONTROLLER"],
             "engine_env": ["VLLM_USE_V1=1"],
             "engine_args": ["--disable-log-requests", "--host=localhost", "--port=12346",
                             "--gpu-memory-utilization 0.35"]},
            {"name": "qwen", "model": "Qwen/Qwen2.5-0.5B", "port": 12347, "sleep_level": "stop",
             "engine_args": "--max-model-len 2048 --served-model-name qwen-small"},
        ]})
    llama, qwen = config.instances
    assert config.kvcached == {"KVCACHED_LOG_LEVEL": "INFO", "KVCACHED_SANITY_CHECK": "false"}
    assert config.router.router_host == "127.0.0.1" and config.sleep_manager.min_sleep_duration == 80
    assert llama.port == 12346 and llama.host == "127.0.0.1"
    assert llama.engine_args == ["--disable-log-requests", "--gpu-memory-utilization", "0.35"]
    assert config.uses_kvcached(llama) and not config.uses_kvcached(qwen)
    assert config.environment(llama)["KVCACHED_IPC_NAME"] == "CONTROLLER"
    assert qwen.engine_args == ["--max-model-len", "2048", "--served-model-name", "qwen-small"]
    assert qwen.served_model_name == "qwen-small" and qwen.sleep_level == "stop"


@pytest.mark.parametrize("data, words", [
    ({"instances": [{"name": "a", "model": "m"}], "routr": {}}, ["`routr`", "did you mean `router`"]),
    ({"instances": [{"name": "a", "model": "m", "engine_arg": []}]}, ["`engine_arg`", "`engine_args`", "instances[0]"]),
    ({"instances": [{"name": "a", "model": "m"}], "sleep_manager": {"idle_treshold_seconds": 3}},
     ["idle_threshold_seconds"]),
    ({"instances": [{"name": "a"}]}, ["no `model`", "instances[0] (a)"]),
    ({"instances": [{"model": "m"}]}, ["name", "missing"]),
    ({"instances": []}, ["`instances`", "at least one"]),
    ({"instances": [{"name": "a", "model": "m", "port": 9001}, {"name": "b", "model": "n", "port": 9001}]},
     ["duplicate port 9001", "instance 'a'"]),
    ({"instances": [{"name": "a", "model": "m"}, {"name": "a", "model": "n"}]}, ["duplicate instance name 'a'"]),
    ({"instances": [{"name": "a", "model": "m"}, {"name": "b", "model": "m"}]}, ["--served-model-name"]),
    ({"instances": [{"name": "a", "model": "m", "engine": "tgi"}]}, ["engine", "vllm, sglang"]),
    ({"instances": [{"name": "a", "model": "m", "sleep_level": "kvv"}]}, ["did you mean `kv`"]),
    ({"instances": [{"name": "a", "model": "m", "port": "eighty"}]}, ["TCP port"]),
    ({"instances": [{"name": "a", "model": "m", "port": 1, "engine_args": ["--port=2"]}]}, ["disagree"]),
    ({"instances": [{"name": "a", "model": "m", "kvcached_env": ["ENABLE_KVCACHED"]}]}, ["KEY=VALUE"]),
    ({"instances": [{"name": "a", "model": "m", "venv_path": "/nonexistent/venv"}]}, ["bin/python", "venv_path"]),
    ({"instances": [{"name": "a", "model": "m"}], "router": {"enable_router": "maybe"}}, ["true or false"]),
])
def test_bad_configs_name_the_key_and_the_fix(data, words):
    with pytest.raises(FleetConfigError) as info:
        parse(data)
    for word in words:
        assert word in str(info.value)


def test_a_port_in_use_is_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(FleetConfigError, match=f"port {port} .*already in use"):
            parse({"instances": [{"name": "a", "model": "m", "port": port}]}, check_ports=True)
        parse({"instances": [{"name": "a", "model": "m", "port": port}]}, check_ports=False)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "fleet.yaml"
    bad.write_text("instances: [\n")
    with pytest.raises(FleetConfigError, match="not valid YAML"):
        load_fleet_config(bad)
    with pytest.raises(FleetConfigError, match="not found"):
        load_fleet_config(tmp_path / "missing.yaml")
    bad.write_text("instances:\n  - name: a\n    modle: m\n")
    with pytest.raises(FleetConfigError, match=r"fleet.yaml: unknown key `modle`.*did you mean `model`"):
        load_fleet_config(bad)


def test_commands_exit_2_with_the_message(tmp_path, capsys):
    bad = tmp_path / "fleet.yaml"
    bad.write_text("instances:\n  - name: a\n    model: m\n    engin: vllm\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "did you mean `engine`" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("instances:\n  - name: a\n    model: m\n")
    assert main(["router", "--config", str(good)]) == 2
    assert "have no port" in capsys.readouterr().err


@pytest.mark.parametrize("example", ["fleet-tiny.yaml", "fleet-gpu.yaml"])
def test_examples_parse(example):
    config = load_fleet_config(REPO / "examples" / example, check_ports=False)
    assert len(config.instances) == 2
    assert any(config.uses_kvcached(i) for i in config.instances)

"""Fleet YAML parsing: the controller's format is accepted, and every mistake gets a message naming key and fix."""
from __future__ import annotations

import socket
import subprocess
import sys
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


# ---- hostile and mistaken input -----------------------------------------------------------------------------

ONE = [{"name": "a", "model": "m"}]


@pytest.mark.parametrize("section, words", [
    ({"enable_kvcahced": True}, ["`enable_kvcahced`", "did you mean `enable_kvcached`"]),
    ({"ipc_nam": "g"}, ["`ipc_nam`", "did you mean `ipc_name`"]),
    ({"KVCACHED_IPC_NAM": "g"}, ["did you mean `KVCACHED_IPC_NAME`"]),
    ({"VLLM_USE_V1": "1"}, ["`VLLM_USE_V1`", "engine_env"]),
])
def test_an_unknown_kvcached_key_is_refused_with_a_suggestion(section, words):
    with pytest.raises(FleetConfigError) as info:
        parse({"kvcached": section, "instances": ONE})
    for word in words:
        assert word in str(info.value)
    assert "`kvcached`" in str(info.value)


def test_kvcached_keys_in_every_accepted_form():
    config = parse({"kvcached": {"enable_kvcached": True, "ipc_name": "g", "KVCACHED_LOG_LEVEL": "DEBUG",
                                 "kvcached_sanity_check": False, "ENABLE_KVCACHED": "1", "Reclaim_Delay_S": 2},
                    "instances": ONE})
    assert config.kvcached == {"ENABLE_KVCACHED": "1", "KVCACHED_IPC_NAME": "g", "KVCACHED_LOG_LEVEL": "DEBUG",
                               "KVCACHED_SANITY_CHECK": "false", "KVCACHED_RECLAIM_DELAY_S": "2"}


@pytest.mark.parametrize("env_key", ["kvcached_env", "engine_env"])
@pytest.mark.parametrize("entry, suggestion", [
    ("KVCACHED_IPC_NAM=g", "KVCACHED_IPC_NAME"),
    ("ENABLE_KVCAHCED=true", "ENABLE_KVCACHED"),
    ("KVCACHED_ENABLE=true", "ENABLE_KVCACHED"),
])
def test_a_misspelt_kvcached_variable_in_an_instance_is_refused(env_key, entry, suggestion):
    with pytest.raises(FleetConfigError) as info:
        parse({"instances": [{"name": "a", "model": "m", env_key: [entry]}]})
    assert f"instances[0] (a).{env_key}" in str(info.value) and f"did you mean `{suggestion}`" in str(info.value)


def test_other_variables_in_an_instance_stay_free():
    config = parse({"instances": [{"name": "a", "model": "m",
                                   "kvcached_env": ["ENABLE_KVCACHED=true", "MY_OWN=1", "VLLM_USE_V1=1"],
                                   "engine_env": {"HF_HUB_OFFLINE": 1, "KVCACHED_SHM_DIR": "/tmp/x"}}]})
    assert config.environment(config.instances[0]) == {"ENABLE_KVCACHED": "true", "MY_OWN": "1", "VLLM_USE_V1": "1",
                                                       "HF_HUB_OFFLINE": "1", "KVCACHED_SHM_DIR": "/tmp/x"}


BILLION_LAUGHS = """\
instances:
  - name: a
    model: m
    engine_args:
      - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
      - &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
      - &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
      - &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
      - &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
      - &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
      - &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
      - &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
      - &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.faults
def test_nested_aliases_are_refused_before_they_expand(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    # In a child with a memory cap: a regression fails this test instead of taking the machine's memory.
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
            "from kvlab.engines.fleet_config import FleetConfigError, load_fleet_config\n"
            "try:\n"
            "    load_fleet_config(sys.argv[1], check_ports=False)\n"
            "except FleetConfigError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bomb.yaml" in out.stdout and "100,000" in out.stdout and "aliases" in out.stdout


def test_aliases_within_the_bound_keep_working(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("instances:\n"
                    "  - {name: a, model: m, kvcached_env: &env [\"ENABLE_KVCACHED=true\", \"KVCACHED_IPC_NAME=g\"]}\n"
                    "  - {name: b, model: n, kvcached_env: *env}\n")
    config = load_fleet_config(path, check_ports=False)
    assert all(config.uses_kvcached(i) for i in config.instances)
    assert config.environment(config.instances[1])["KVCACHED_IPC_NAME"] == "g"


@pytest.mark.faults
def test_an_alias_to_itself_is_refused(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("instances: [{name: a, model: m, engine_args: &x [*x]}]\n")
    with pytest.raises(FleetConfigError, match="refers to itself"):
        load_fleet_config(path, check_ports=False)


@pytest.mark.parametrize("section, key", [
    ("sleep_manager", "idle_threshold_seconds"), ("sleep_manager", "check_interval_seconds"),
    ("sleep_manager", "min_sleep_duration"), ("sleep_manager", "drain_timeout_seconds"),
    ("router", "traffic_window_seconds"), ("router", "request_timeout_seconds"), ("router", "max_body_bytes"),
    (None, "launch_delay_seconds"),
])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_infinity_are_refused(tmp_path, section, key, value):
    path = tmp_path / "fleet.yaml"
    setting = f"{section}:\n  {key}: {value}\n" if section else f"{key}: {value}\n"
    path.write_text(setting + "instances: [{name: a, model: m}]\n")
    with pytest.raises(FleetConfigError, match=f"{key}.*finite number"):
        load_fleet_config(path, check_ports=False)


@pytest.mark.faults
def test_unreadable_fleet_files_are_config_errors(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("instances: [{name: caf\u00e9, model: m}]\n".encode("latin-1"))
    with pytest.raises(FleetConfigError, match=r"latin.yaml.*not UTF-8.*save it as UTF-8"):
        load_fleet_config(latin)
    with pytest.raises(FleetConfigError, match=r"is a directory.*--config"):
        load_fleet_config(tmp_path)
    with pytest.raises(FleetConfigError, match=r"cannot read"):
        load_fleet_config("/proc/self/mem")  # unreadable at offset 0, even for root
    dated = tmp_path / "dated.yaml"
    dated.write_text("launch_delay_seconds: 2020-13-45\ninstances: [{name: a, model: m}]\n")
    with pytest.raises(FleetConfigError, match="dated.yaml"):
        load_fleet_config(dated)


@pytest.mark.faults
@pytest.mark.parametrize("command", ["serve", "router"])
def test_commands_given_a_directory_exit_2(tmp_path, capsys, command):
    assert main([command, "--config", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("given, expected", [
    ("localhost", "127.0.0.1"), ("LOCALHOST", "127.0.0.1"), ("localhost.", "127.0.0.1"),
    ("localhost.corp", "localhost.corp"), ("my-localhost", "my-localhost"), ("10.0.0.2", "10.0.0.2"),
])
def test_localhost_is_replaced_only_as_a_whole_name(given, expected):
    config = parse({"router": {"router_host": given},
                    "instances": [{"name": "a", "model": "m", "host": given},
                                  {"name": "b", "model": "n", "engine_args": f"--host {given}"}]})
    assert config.router.router_host == expected
    assert [i.host for i in config.instances] == [expected, expected]


@pytest.mark.parametrize("host", ["", 8080, "two words"])
def test_a_host_that_is_not_a_name_is_refused(host):
    with pytest.raises(FleetConfigError, match="router.router_host"):
        parse({"router": {"router_host": host}, "instances": ONE})


@pytest.mark.faults
def test_serve_status_given_a_directory_exits_2(tmp_path, capsys):
    assert main(["serve", "status", "--config", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_prefix_store_per_instance():
    config = parse({"instances": [
        {"name": "a", "model": "m", "prefix_store": "docs"},
        {"name": "b", "model": "n", "prefix_store": {"store": "/shared/kv", "max_bytes": 1 << 30}},
        {"name": "c", "model": "o"}, {"name": "d", "model": "p", "prefix_store": {"store": "x", "max_bytes": "2G"}}]})
    a, b, c, d = config.instances
    assert d.prefix_store_max_bytes == 2 << 30
    assert (a.prefix_store, a.prefix_store_max_bytes) == ("docs", None)
    assert (b.prefix_store, b.prefix_store_max_bytes) == ("/shared/kv", 1 << 30)
    assert c.prefix_store is None
    for bad, words in ((["docs"], "mapping"), ({"store": "docs", "max_byte": 1}, "did you mean `max_bytes`"),
                       ({"store": "docs", "max_bytes": -1}, "invalid size"),
                       ({"store": "docs", "max_bytes": "2X"}, "invalid size"), ("", "empty")):
        with pytest.raises(FleetConfigError, match=words):
            parse({"instances": [{"name": "a", "model": "m", "prefix_store": bad}]})
    with pytest.raises(FleetConfigError, match="vLLM KV connector"):
        parse({"instances": [{"name": "a", "model": "m", "engine": "sglang", "prefix_store": "docs"}]})

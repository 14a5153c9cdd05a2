"""Run directories: files written as the run goes, failure keeps the data, summaries and comparisons."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from kvlab.engines.errors import ServerError
from kvlab.load.records import RequestRecord
from kvlab.probes import MEM_BYTES, HostTreeSource
from kvlab.runs import Run, compare, latest_run, load_run, memory_summary, new_run_id, summary_table


def _record(series: str, i: int, ttft: float, e2e: float, status: str = "ok") -> RequestRecord:
    t = time.monotonic()
    return RequestRecord(series=series, model="m", url="http://x", request_id=f"{series}-{i}", scheduled_s=t,
                         send_s=t, first_token_s=t + ttft if status == "ok" else None,
                         end_s=t + e2e, chunk_times=[t + ttft, t + e2e], prompt_tokens=8, output_tokens=4,
                         status=status, http_status=200 if status == "ok" else 500)


def test_run_writes_params_env_and_running_summary_at_once(tmp_path: Path) -> None:
    run = Run("exp", {"model": "tiny", "burst_size": 4}, root=tmp_path)
    assert run.dir.parent == tmp_path / "exp"
    assert json.loads(run.params_path.read_text()) == {"model": "tiny", "burst_size": 4}
    env = json.loads((run.dir / "env.json").read_text())
    assert env["python"] == sys.version.split()[0]
    assert "vllm" in env and "torch" in env and env["kvlab"]
    assert json.loads(run.summary_path.read_text())["status"] == "running"
    with pytest.raises(FileExistsError):
        Run("exp", {}, root=tmp_path, run_id=run.run_id)


def test_run_id_format() -> None:
    rid = new_run_id()
    date, clock, suffix = rid.split("-")
    assert len(date) == 8 and len(clock) == 6 and len(suffix) == 8  # 32 random bits: a sweep starts many at once


def test_records_are_on_disk_immediately(tmp_path: Path) -> None:
    run = Run("exp", {}, root=tmp_path)
    run.record(_record("a", 0, 0.1, 0.5))
    first = pd.read_csv(run.requests_csv)
    assert list(first["request_id"]) == ["a-0"]
    run.record(_record("a", 1, 0.2, 0.6))
    assert len(pd.read_csv(run.requests_csv)) == 2


def test_summary_has_the_contract_fields_per_series(tmp_path: Path) -> None:
    # Filled (not zero) memory, so its pages are resident; "ready" once it is.
    proc = subprocess.Popen([sys.executable, "-c", "import sys; b = b'x' * (40 << 20); print('ready', flush=True); "
                             "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    try:
        with Run("exp", {}, root=tmp_path) as run:
            with run.sampler([HostTreeSource("static", proc.pid, pss_interval_s=None)]):
                with run.phase("idle", series="static"):
                    time.sleep(0.2)
                with run.phase("load", series="static"):
                    for i in range(4):
                        run.record(_record("static", i, 0.1 * (i + 1), 1.0))
                    run.record(_record("static", 9, 0.0, 0.1, status="error"))
            summary = run.finish({"static": run.series_summary("static")})
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    on_disk = json.loads(run.summary_path.read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["status"] == "ok" and on_disk["error"] is None
    assert [p["name"] for p in on_disk["phases"]] == ["idle", "load"]
    fig = on_disk["series"]["static"]
    for key in ("idle_mem_mb", "peak_mem_mb", "flex_mb", "ttft_p50_s", "ttft_p99_s", "latency_p50_s",
                "latency_p99_s", "requests_ok", "requests_failed"):
        assert key in fig, key
    assert fig["requests_ok"] == 4 and fig["requests_failed"] == 1
    assert fig["idle_mem_mb"] >= 40 * (1 << 20) / 1e6
    assert fig["flex_mb"] == pytest.approx(fig["peak_mem_mb"] - fig["idle_mem_mb"])
    assert fig["ttft_p50_s"] == pytest.approx(0.25, abs=1e-6)  # failed request kept out


def test_crash_mid_run_keeps_data_and_marks_failed(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    run_dir = None
    try:
        with pytest.raises(ServerError):
            with Run("exp", {}, root=tmp_path) as run:
                run_dir = run.dir
                run.sampler([HostTreeSource("s", proc.pid, pss_interval_s=None)]).start()
                with run.phase("load", series="s"):
                    run.record(_record("s", 0, 0.1, 0.2))
                    time.sleep(0.1)
                    raise ServerError("vLLM server s is not running", log_text="line one\nKilled\n")
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    data = load_run(run_dir)
    assert data.status == "failed"
    assert "ServerError" in data.summary["error"] and "out of memory" in data.summary["error"]
    assert "Killed" in data.summary["error_log_tail"]
    assert data.phases[0]["name"] == "load" and data.phases[0]["end_s"] is not None
    assert len(data.requests) == 1
    assert len(data.memory) > 0 and set(data.memory["series"]) == {"s"}
    assert "Traceback" in (run_dir / "error.txt").read_text()


def test_memory_summary_uses_idle_phases() -> None:
    mem = pd.DataFrame({"t_s": [0, 1, 2, 3, 4], "series": ["a"] * 5, "metric": [MEM_BYTES] * 5,
                        "value": [100e6, 110e6, 500e6, 300e6, 120e6]})
    phases = [{"name": "idle", "start_s": 0, "end_s": 1.5, "series": "a"},
              {"name": "load", "start_s": 1.5, "end_s": 3.5, "series": "a"},
              {"name": "idle", "start_s": 0, "end_s": 9, "series": "b"}]  # another series' idle: ignored
    out = memory_summary(mem, "a", phases)
    assert out == {"idle_mem_mb": 105.0, "peak_mem_mb": 500.0, "flex_mb": 395.0}
    assert memory_summary(mem, "a")["idle_mem_mb"] == 100.0  # no idle phase: the first sample
    assert memory_summary(mem, "zzz")["idle_mem_mb"] is None


def test_compare_and_summary_table(tmp_path: Path) -> None:
    for i, (series, idle, peak) in enumerate((("static", 3000.0, 3100.0), ("kvcached", 1000.0, 2900.0))):
        # Explicit ids: two runs in the same second sort by their random suffix, not by creation.
        with Run("cmp", {"series": series}, root=tmp_path, run_id=f"20260101-00000{i}-0000") as run:
            run.finish({series: {"idle_mem_mb": idle, "peak_mem_mb": peak, "flex_mb": peak - idle,
                                 "ttft_p50_s": 0.1, "requests_ok": 3, "requests_failed": 0}})
    runs = sorted((tmp_path / "cmp").iterdir())
    df = compare(*runs)
    assert list(df["series"]) == ["static", "kvcached"]
    kv = df[df.series == "kvcached"].iloc[0]
    assert kv["idle_savings_mb"] == 2000.0 and kv["peak_savings_mb"] == 200.0
    assert kv["idle_savings_pct"] == pytest.approx(200 / 3)
    assert latest_run("cmp", root=tmp_path).dir in runs
    table = summary_table(runs[1])
    assert table.loc["kvcached", "idle_mem_mb"] == 1000.0
    with pytest.raises(FileNotFoundError, match="run the experiment"):
        latest_run("nothing", root=tmp_path)


def test_env_json_keeps_serving_variables_and_never_a_secret(tmp_path: Path, monkeypatch) -> None:
    kept = {"ENABLE_KVCACHED": "true", "KVCACHED_IPC_NAME": "g", "CUDA_VISIBLE_DEVICES": "0",
            "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_PLUGINS": "kvcached", "VLLM_USE_V1": "1",
            "VLLM_ATTENTION_BACKEND": "TORCH_SDPA", "VLLM_TARGET_DEVICE": "cpu"}
    secret = "sk-do-not-store-4f1c"
    dropped = {"VLLM_API_KEY": secret, "HF_TOKEN": secret, "KVCACHED_ADMIN_TOKEN": secret,
               "VLLM_S3_SECRET": secret, "CUDA_VISIBLE_PASSWORD": secret, "VLLM_SOMETHING_NEW": "x",
               "KVCACHED_NOT_A_KNOB": "x", "HOME_TOKEN_FILE": secret}
    for name, value in {**kept, **dropped}.items():
        monkeypatch.setenv(name, value)
    run = Run("exp", {}, root=tmp_path)
    text = (run.dir / "env.json").read_text()
    env = json.loads(text)["env"]
    assert {k: env[k] for k in kept} == kept
    assert not set(dropped) & set(env)
    assert secret not in text

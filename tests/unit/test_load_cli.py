"""`kvlab load` end to end against the fake OpenAI server, and `kvlab bench load` on the no-op server."""
import json

import pytest

from kvlab.bench.load import pacing
from kvlab.cli import main
from kvlab.load.records import read_requests_csv


def test_load_writes_requests_and_summary(fake_openai_server, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["load", "--url", fake_openai_server.url, "--model", "m", "--arrival", "constant", "--rate", "20",
               "--duration", "0.5", "--prompt-tokens", "9", "--max-tokens", "3", "--slo-ttft", "5",
               "--out", str(out), "--no-progress", "--json"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(capsys.readouterr().out) == summary
    assert summary["requests_ok"] == 10 and summary["requests_failed"] == 0
    assert summary["good_requests"] == 10 and summary["goodput"] > 0
    assert summary["arrival"]["kind"] == "constant" and summary["t0_epoch_s"] > 1e9
    for key in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "itl_p50_s", "latency_p50_s", "latency_p99_s",
                "output_tokens_per_s", "request_rate"):
        assert summary[key] is not None and summary[key] >= 0, key
    records = read_requests_csv(out / "requests.csv")
    assert len(records) == 10
    assert all(r.prompt_tokens == 9 and r.output_tokens == 3 and len(r.chunk_times) == 3 for r in records)


def test_load_prompts_file_and_non_stream(fake_openai_server, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a b c"}\n{"prompt": "d e"}\n')
    out = tmp_path / "run"
    assert main(["load", "--url", fake_openai_server.url, "--model", "m", "--arrival", "bursts",
                 "--burst-size", "4", "--burst-every", "1", "--burst-count", "1", "--prompts-file", str(prompts),
                 "--no-stream", "--max-tokens", "2", "--out", str(out), "--no-progress"]) == 0
    records = read_requests_csv(out / "requests.csv")
    assert sorted(r.prompt_tokens for r in records) == [3, 3, 4, 4]
    assert all(r.chunk_times == [] for r in records)


def test_load_bad_flags_exit_2_naming_the_flag(fake_openai_server, tmp_path, capsys):
    assert main(["load", "--url", fake_openai_server.url, "--model", "m", "--arrival", "poisson",
                 "--duration", "1", "--out", str(tmp_path)]) == 2
    assert "--rate" in capsys.readouterr().err
    assert main(["load", "--url", fake_openai_server.url, "--model", "m", "--arrival", "poisson", "--rate", "1",
                 "--out", str(tmp_path)]) == 2
    assert "duration" in capsys.readouterr().err


def test_pacing_estimator():
    rate = 100.0
    perfect = [5.0 + 0.0003 + i / rate for i in range(50)]
    p = pacing(perfect, rate, 50, t0=5.0)
    assert p["rate_ratio"] == pytest.approx(1.0)
    assert p["error_p99_s"] == pytest.approx(0.0, abs=1e-9)
    assert p["abs_lag_p99_s"] == pytest.approx(0.0003)
    late = list(perfect)
    late[10] += 0.05  # one request 50 ms late: it overtakes 5 slots of 10 ms
    p = pacing(late, rate, 50)
    # Arrivals are matched to the schedule by order (vLLM's client sends no request id), so the late
    # request shows as the 5 slots it overtook each arriving one gap (10 ms) late.
    assert p["error_max_s"] == pytest.approx(0.01) and p["arrived"] == 50
    assert p["error_p99_s"] > 0.005
    assert pacing([1.0], rate, 5)["rate_ratio"] is None


def test_bench_load_kvlab_row(capsys):
    # Low rate: this checks the benchmark's plumbing and output, not the machine's speed.
    assert main(["bench", "load", "--no-vllm", "--rate", "50", "--duration", "0.4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    row = result["kvlab"]
    assert row["expected"] == 20 and row["arrived"] == 20 and row["requests_ok"] == 20
    assert row["rate_ratio"] > 0.5 and row["error_p99_s"] >= 0
    assert row["pass"] == (row["rate_ratio"] >= 0.99 and row["error_p99_s"] <= 0.002)
    assert "vllm" not in result


@pytest.mark.parametrize("flags, named", [
    (["--arrival", "constant", "--rate", "5", "--duration", "-1"], "--duration"),
    (["--arrival", "constant", "--rate", "5", "--duration", "nan"], "--duration"),
    (["--arrival", "constant", "--rate", "5", "--duration", "inf"], "--duration"),
    (["--arrival", "constant", "--rate", "5", "--duration=0"], "--duration"),
    (["--arrival", "constant", "--rate=-5", "--duration", "1"], "--rate"),
    (["--arrival", "constant", "--rate", "nan", "--duration", "1"], "--rate"),
    (["--arrival", "bursts", "--burst-size", "2", "--burst-every", "1", "--burst-count", "-1"], "--burst-count"),
    (["--arrival", "bursts", "--burst-size", "-2", "--burst-every", "1", "--burst-count", "1"], "--burst-size"),
    (["--arrival", "bursts", "--burst-size", "2", "--burst-every", "-1", "--burst-count", "1"], "--burst-every"),
    (["--arrival", "bursts", "--burst-size", "2", "--burst-every", "inf", "--burst-count", "1"], "--burst-every"),
    (["--arrival", "constant", "--rate", "5", "--duration", "1", "--concurrency", "0"], "--concurrency"),
    (["--arrival", "constant", "--rate", "5", "--duration", "1", "--concurrency", "-3"], "--concurrency"),
    (["--arrival", "constant", "--rate", "5", "--duration", "1", "--timeout", "-1"], "--timeout"),
    (["--arrival", "constant", "--rate", "5", "--duration", "1", "--timeout", "nan"], "--timeout"),
    (["--arrival", "constant", "--rate", "5", "--duration", "1", "--timeout", "inf"], "--timeout"),
    (["--arrival", "constant", "--rate", "5", "--duration", "1", "--max-tokens", "0"], "--max-tokens"),
    (["--arrival", "constant", "--rate", "5", "--duration", "1", "--prompt-tokens", "-1"], "--prompt-tokens"),
    (["--arrival", "constant", "--rate", "5", "--duration", "1", "--slo-ttft", "nan"], "--slo-ttft"),
    (["--arrival", "constant", "--rate", "5", "--duration", "1", "--slo-e2e", "-1"], "--slo-e2e"),
])
def test_load_refuses_bad_numbers_before_sending_anything(fake_openai_server, tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    rc = main(["load", "--url", fake_openai_server.url, "--model", "m", "--prompt-tokens", "3", *flags,
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and named in err and "Traceback" not in err
    assert not out.exists() and fake_openai_server.arrivals == []


@pytest.mark.faults
def test_load_names_the_bad_line_of_a_trace(fake_openai_server, tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("timestamp,prompt_tokens\n0,3\n0.1,lots\n")
    out = tmp_path / "run"
    rc = main(["load", "--url", fake_openai_server.url, "--model", "m", "--arrival", "trace", "--trace", str(trace),
               "--out", str(out), "--no-progress"])
    assert rc == 2 and f"{trace}:3:" in capsys.readouterr().err
    assert not out.exists() and fake_openai_server.arrivals == []

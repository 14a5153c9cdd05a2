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


@pytest.fixture
def plain_openai_server():
    """An OpenAI-compatible server with no /tokenize (not vLLM): what many users point `kvlab load` at."""
    from fake_openai_server import FakeOpenAIServer

    server = FakeOpenAIServer(tokenize=False).start()
    yield server
    server.stop()


def test_load_drives_a_server_without_tokenize_by_an_approximation_with_one_warning(plain_openai_server, tmp_path,
                                                                                    capsys):
    out = tmp_path / "run"
    rc = main(["load", "--url", plain_openai_server.url + "/v1", "--model", "m", "--arrival", "bursts",
               "--burst-size", "3", "--burst-every", "1", "--burst-count", "1", "--prompt-tokens", "20",
               "--max-tokens", "2", "--out", str(out), "--no-progress"])
    assert rc == 0, "never a refusal"
    err = capsys.readouterr().err
    assert err.count("approximation") == 1 and "--tokenizer" in err, err
    records = read_requests_csv(out / "requests.csv")
    assert len(records) == 3 and all(r.ok for r in records)
    assert all(abs(r.prompt_tokens - 20) <= 2 for r in records), "near the length asked for"


def test_a_local_tokenizer_fits_prompts_exactly_for_a_server_without_tokenize(plain_openai_server, tmp_path):
    from kvlab.load.prompts import LocalTokenizer, synthetic_prompt
    from kvlab.tiny_model import TinyModelSpec, write_tiny_model

    model = tmp_path / "tok-model"
    write_tiny_model(model, TinyModelSpec(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64, vocab=512))
    text = synthetic_prompt(plain_openai_server.url, "m", 40, variant=3, tokenizer=str(model))
    assert len(LocalTokenizer(str(model)).encode(text, special=True)) == 40
    out = tmp_path / "run"
    assert main(["load", "--url", plain_openai_server.url, "--model", "m", "--arrival", "bursts", "--burst-size",
                 "2", "--burst-every", "1", "--burst-count", "1", "--prompt-tokens", "40", "--tokenizer",
                 str(model), "--max-tokens", "2", "--out", str(out), "--no-progress"]) == 0
    assert len(read_requests_csv(out / "requests.csv")) == 2
    assert main(["load", "--url", plain_openai_server.url, "--model", "m", "--duration", "1", "--tokenizer",
                 str(tmp_path / "no-such-model"), "--out", str(tmp_path / "r2"), "--no-progress"]) == 2


def test_load_takes_sharegpt_and_burstgpt_files(fake_openai_server, tmp_path):
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "one two three"}, {"from": "gpt", "value": "ok"}]},
        {"conversations": [{"from": "human", "value": "alone"}]},  # no reply: skipped, as vLLM's reader does
        {"conversations": [{"from": "human", "value": "four five"}, {"from": "gpt", "value": "fine"}]},
    ]))
    out = tmp_path / "share"
    assert main(["load", "--url", fake_openai_server.url, "--model", "m", "--arrival", "bursts", "--burst-size",
                 "4", "--burst-every", "1", "--burst-count", "1", "--dataset-name", "sharegpt", "--dataset-path",
                 str(sharegpt), "--max-tokens", "2", "--out", str(out), "--no-progress"]) == 0
    sent = sorted(a.body["prompt"] for a in fake_openai_server.arrivals)
    assert sent == ["four five", "four five", "one two three", "one two three"]

    burst = tmp_path / "burstgpt.csv"  # BurstGPT's own columns
    burst.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                     "100.0,ChatGPT,12,3,15,Conversation log\n100.2,GPT-4,7,5,12,API log\n"
                     "100.5,ChatGPT,9,0,9,Conversation log\n")
    out = tmp_path / "burst"
    assert main(["load", "--url", fake_openai_server.url, "--model", "m", "--dataset-name", "burstgpt",
                 "--dataset-path", str(burst), "--out", str(out), "--no-progress"]) == 0
    records = sorted(read_requests_csv(out / "requests.csv"), key=lambda r: r.scheduled_s)
    assert [r.prompt_tokens for r in records] == [12, 7, 9]
    assert [r.output_tokens for r in records] == [3, 5, 1], "a failed request's 0 response tokens asks for 1"
    assert [round(r.scheduled_s - records[0].scheduled_s, 1) for r in records] == [0.0, 0.2, 0.5]
    assert main(["load", "--url", fake_openai_server.url, "--model", "m", "--dataset-name", "sharegpt",
                 "--duration", "1", "--out", str(tmp_path / "x"), "--no-progress"]) == 2, "no --dataset-path"

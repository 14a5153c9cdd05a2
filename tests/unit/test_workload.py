"""run_workload against the fake OpenAI server: pacing, streaming records, failures, prompts, several targets."""
import asyncio
import statistics

import pytest

from kvlab.load.arrivals import ArrivalSpec
from kvlab.load.prompts import SyntheticPrompts, synthetic_prompt
from kvlab.load.records import RecordList
from kvlab.load.workload import Target, run_workload


def by_id(records):
    return {r.request_id: r for r in records}


def test_constant_pacing_on_an_absolute_schedule(fake_openai_server):
    # A slow first token on every request must not delay the sends after it (open loop).
    fake_openai_server.first_token_delay_s = 0.3
    target = Target(fake_openai_server.url, "m", ArrivalSpec("constant", rate=20.0), prompts=["hello world"],
                    max_tokens=2)
    records = run_workload(target, 1.0, progress=False)
    assert isinstance(records, RecordList) and len(records) == 20
    assert all(r.ok for r in records), [r.error for r in records if not r.ok]
    arrivals = sorted(a.t for a in fake_openai_server.arrivals)
    # Server-side arrival i minus its schedule: small and not growing (statistically loose bounds, not a
    # performance target).
    errors = [a - (records.t0_s + i / 20.0) for i, a in enumerate(arrivals)]
    assert min(errors) > -0.001
    assert statistics.median(errors) < 0.1
    assert arrivals[-1] - arrivals[0] == pytest.approx(0.95, abs=0.1)
    for r in records:
        assert r.scheduled_s == pytest.approx(records.t0_s + int(r.request_id.split("-")[1]) / 20.0)
        assert r.send_s >= r.scheduled_s - 1e-6
        assert r.ttft_s >= 0.3 - 0.01


def test_stream_record_fields(fake_openai_server):
    fake_openai_server.token_delay_s = 0.02
    target = Target(fake_openai_server.url, "m", ArrivalSpec("bursts", burst_size=2, burst_every=1.0,
                                                             burst_count=1),
                    prompts=["one two three"], max_tokens=5, series="static")
    seen = []
    records = run_workload(target, None, progress=False, on_record=seen.append)
    assert seen == list(records) and len(records) == 2
    r = records[0]
    assert (r.status, r.http_status, r.error) == ("ok", 200, None)
    assert r.series == "static" and r.model == "m" and r.url == fake_openai_server.url
    assert r.prompt_tokens == 4 and r.output_tokens == 5, "token counts come from the server's usage"
    assert len(r.chunk_times) == 5 and r.first_token_s == r.chunk_times[0]
    assert r.send_s <= r.first_token_s <= r.chunk_times[-1] <= r.end_s
    assert all(g >= 0.015 for g in r.itl_s)
    body = fake_openai_server.arrivals[0].body
    assert body["stream"] is True and body["ignore_eos"] is True and body["max_tokens"] == 5
    assert body["stream_options"] == {"include_usage": True}
    assert {a.request_id for a in fake_openai_server.arrivals} == {"static-0", "static-1"}


def test_non_stream_and_chat(fake_openai_server):
    spec = ArrivalSpec("bursts", burst_size=1, burst_every=1.0, burst_count=1)
    plain = run_workload(Target(fake_openai_server.url, "m", spec, ["a b"], max_tokens=3, stream=False),
                         None, progress=False)[0]
    assert plain.ok and plain.output_tokens == 3 and plain.first_token_s is None and plain.chunk_times == []
    assert plain.e2e_s > 0
    chat = run_workload(Target(fake_openai_server.url, "m", spec, ["a b"], max_tokens=3, endpoint="chat"),
                        None, progress=False)[0]
    assert chat.ok and len(chat.chunk_times) == 3 and chat.output_tokens == 3
    assert fake_openai_server.arrivals[-1].body["messages"] == [{"role": "user", "content": "a b"}]


def test_failures_are_recorded_not_raised(fake_openai_server):
    spec = ArrivalSpec("bursts", burst_size=4, burst_every=1.0, burst_count=1)
    target = Target(fake_openai_server.url, "m", spec, ["fine", "FAIL please", "HANG please", "CUT please"],
                    max_tokens=3)
    records = by_id(run_workload(target, None, progress=False, request_timeout_s=1.0))
    assert records["m-0"].status == "ok"
    assert records["m-1"].status == "error" and records["m-1"].http_status == 500
    assert "injected failure" in records["m-1"].error
    assert records["m-2"].status == "timeout"
    assert records["m-3"].status == "error" and records["m-3"].end_s is not None


def test_unreachable_server_is_an_error_record():
    spec = ArrivalSpec("bursts", burst_size=1, burst_every=1.0, burst_count=1)
    rec = run_workload(Target("http://127.0.0.1:9", "m", spec, ["x"]), None, progress=False)[0]
    assert rec.status == "error" and "Connect" in rec.error


def test_two_targets_share_one_clock(fake_openai_server):
    spec = ArrivalSpec("constant", rate=10.0)
    a = Target(fake_openai_server.url, "m", spec, ["x"], max_tokens=1, series="a")
    b = Target(fake_openai_server.url, "m", spec, ["y"], max_tokens=1, series="b")
    records = run_workload([a, b], 0.5, progress=False)
    assert sorted(r.series for r in records) == ["a"] * 5 + ["b"] * 5
    sched = {r.request_id: r.scheduled_s for r in records}
    assert sched["a-3"] == sched["b-3"] == pytest.approx(records.t0_s + 0.3)
    with pytest.raises(ValueError, match="distinct series"):
        run_workload([a, a], 0.1, progress=False)


def test_concurrency_cap_delays_sends_but_keeps_schedule(fake_openai_server):
    fake_openai_server.first_token_delay_s = 0.2
    spec = ArrivalSpec("bursts", burst_size=4, burst_every=1.0, burst_count=1)
    records = run_workload(Target(fake_openai_server.url, "m", spec, ["x"], max_tokens=1), None,
                           concurrency=1, progress=False)
    sends = sorted(r.send_s for r in records)
    assert all(b - a >= 0.19 for a, b in zip(sends, sends[1:])), "one request in flight at a time"
    assert len({r.scheduled_s for r in records}) == 1


def test_synthetic_prompts_hit_the_exact_token_count(fake_openai_server):
    text = synthetic_prompt(fake_openai_server.url, "m", 12)
    assert len(text.split()) + 1 == 12, "11 words + the BOS the server adds"
    assert synthetic_prompt(fake_openai_server.url, "m", 12) is text, "cached"
    prompts = SyntheticPrompts(7).take(5, url=fake_openai_server.url, model="m")
    assert len(set(prompts)) == 5, "one distinct prompt per request by default"
    assert SyntheticPrompts(7, distinct=2).take(5, url=fake_openai_server.url, model="m", seed=1)[::2] == \
        [SyntheticPrompts(7).take(1, url=fake_openai_server.url, model="m", seed=1)[0]] * 3
    with pytest.raises(ValueError, match="at least 2"):
        synthetic_prompt(fake_openai_server.url, "m", 1)
    records = run_workload(Target(fake_openai_server.url, "m", ArrivalSpec("bursts", burst_size=3, burst_every=1,
                                                                           burst_count=1), prompts=20),
                           None, progress=False)
    assert [r.prompt_tokens for r in records] == [20, 20, 20]


def test_trace_rows_set_prompt_and_output_tokens(fake_openai_server, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("timestamp,prompt_tokens,output_tokens\n0,5,2\n0.05,9,4\n")
    records = by_id(run_workload(Target(fake_openai_server.url, "m", ArrivalSpec("trace", trace_path=str(trace)),
                                        prompts=["unused"]), None, progress=False))
    assert (records["m-0"].prompt_tokens, records["m-0"].output_tokens) == (5, 2)
    assert (records["m-1"].prompt_tokens, records["m-1"].output_tokens) == (9, 4)


def test_runs_inside_a_running_event_loop(fake_openai_server):
    async def notebook_cell():
        spec = ArrivalSpec("bursts", burst_size=1, burst_every=1.0, burst_count=1)
        return run_workload(Target(fake_openai_server.url, "m", spec, ["x"], max_tokens=1), None, progress=False)

    assert asyncio.run(notebook_cell())[0].ok


def test_unbounded_arrival_needs_a_duration():
    with pytest.raises(ValueError, match="duration"):
        run_workload(Target("http://127.0.0.1:9", "m", ArrivalSpec("poisson", rate=1.0), ["x"]), None,
                     progress=False)


@pytest.mark.parametrize("kwargs", [{"duration_s": float("nan")}, {"duration_s": -1.0}, {"concurrency": 0},
                                    {"concurrency": True}, {"request_timeout_s": float("inf")},
                                    {"request_timeout_s": 0}])
def test_arguments_that_would_loop_or_wait_forever_are_refused(kwargs):
    from kvlab.load.arrivals import ArrivalSpec

    target = Target("http://127.0.0.1:9", "m", ArrivalSpec("constant", rate=1.0), ["x"])
    args = {"duration_s": 1.0, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs)).split("_s")[0]):
        run_workload(target, args.pop("duration_s"), progress=False, **args)


@pytest.mark.parametrize("endpoint, stream", [("completions", True), ("chat", True), ("completions", False),
                                              ("chat", False)])
def test_records_keep_the_generated_text(fake_openai_server, endpoint, stream):
    from fake_openai_server import TOKEN_TEXT

    from kvlab.load.arrivals import ArrivalSpec

    target = Target(fake_openai_server.url, "m", ArrivalSpec("bursts", burst_size=1, burst_every=1.0, burst_count=1),
                    ["hello there"], max_tokens=3, stream=stream, endpoint=endpoint)
    (rec,) = run_workload(target, None, progress=False)
    assert rec.ok and rec.text == TOKEN_TEXT * 3, "split UTF-8 and multi-line events still give whole text"

"""Metric formulas on hand-made records; failed requests stay out of latency percentiles."""
import pytest

from kvlab.load.metrics import SLO, percentile, summarize, summarize_by_series
from kvlab.load.records import (
    RequestRecord,
    RequestsCsvWriter,
    append_requests_csv,
    read_requests_csv,
    write_requests_csv,
)


def rec(i, *, send, ttft=None, chunks=(), end=None, out=None, status="ok", series="a", prompt=10):
    first = send + ttft if ttft is not None else None
    return RequestRecord(series=series, model="m", url="http://x", request_id=f"r{i}", scheduled_s=send,
                         send_s=send, first_token_s=first, end_s=end, chunk_times=list(chunks),
                         prompt_tokens=prompt, output_tokens=out, status=status,
                         http_status=200 if status == "ok" else 500, error=None if status == "ok" else "boom")


def test_per_request_formulas():
    r = rec(0, send=10.0, ttft=0.5, chunks=[10.5, 10.7, 11.0, 11.5], end=11.5, out=5)
    assert r.ttft_s == pytest.approx(0.5)
    assert r.e2e_s == pytest.approx(1.5)
    assert r.tpot_s == pytest.approx((1.5 - 0.5) / 4)
    assert r.itl_s == pytest.approx([0.2, 0.3, 0.5])
    assert rec(1, send=0.0, ttft=0.1, chunks=[0.1], end=0.1, out=1).tpot_s is None


def test_percentile_matches_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile([], 50) is None
    assert percentile(list(range(101)), 99) == pytest.approx(99)


def test_summary_excludes_failures_from_latency():
    records = [
        rec(0, send=0.0, ttft=1.0, chunks=[1.0, 2.0], end=2.0, out=2),
        rec(1, send=1.0, ttft=2.0, chunks=[3.0, 5.0], end=5.0, out=2),
        # A fast failure: must not pull latency down.
        RequestRecord(series="a", model="m", url="u", request_id="f", scheduled_s=2.0, send_s=2.0, end_s=2.01,
                      status="error", http_status=500, error="boom", output_tokens=99),
        RequestRecord(series="a", model="m", url="u", request_id="t", scheduled_s=3.0, send_s=3.0, end_s=4.0,
                      status="timeout"),
    ]
    s = summarize(records)
    assert (s["requests"], s["requests_ok"], s["requests_failed"]) == (4, 2, 2)
    assert s["failures"] == {"error": 1, "timeout": 1}
    assert s["ttft_p50_s"] == pytest.approx(1.5)
    assert s["latency_p50_s"] == pytest.approx(3.0)
    assert s["latency_p99_s"] == pytest.approx(2.0 + 0.99 * 2.0)
    assert s["tpot_p50_s"] == pytest.approx(1.5)
    assert s["itl_p50_s"] == pytest.approx(1.5)
    assert s["duration_s"] == pytest.approx(5.0)
    assert s["output_tokens"] == 4, "failed requests' tokens are not counted"
    assert s["output_tokens_per_s"] == pytest.approx(4 / 5.0)
    assert s["request_rate"] == pytest.approx(2 / 5.0)
    assert s["goodput"] is None


def test_goodput_under_slo():
    records = [rec(i, send=float(i), ttft=t, chunks=[i + t, i + t + 0.1], end=i + t + 0.1, out=2)
               for i, t in enumerate([0.1, 0.2, 0.9])]
    records.append(rec(9, send=3.0, ttft=0.05, chunks=[3.05], end=3.05, out=1, status="error"))
    s = summarize(records, slo={"ttft_s": 0.5}, duration_s=10.0)
    assert s["good_requests"] == 2 and s["goodput"] == pytest.approx(0.2)
    s = summarize(records, slo=SLO(ttft_s=0.5, tpot_s=0.05), duration_s=10.0)
    assert s["good_requests"] == 0
    with pytest.raises(ValueError, match="ttft_s"):
        summarize(records, slo={"ttft": 500})


def test_all_failed_gives_none_latencies():
    s = summarize([rec(0, send=0.0, end=1.0, status="error")])
    assert s["requests_ok"] == 0 and s["ttft_p50_s"] is None and s["latency_p99_s"] is None


def test_by_series():
    records = [rec(0, send=0, ttft=1, chunks=[1], end=1, out=1, series="static"),
               rec(1, send=0, ttft=2, chunks=[2], end=2, out=1, series="kvcached")]
    by = summarize_by_series(records)
    assert list(by) == ["static", "kvcached"]
    assert by["kvcached"]["ttft_p50_s"] == 2


def test_csv_round_trip_and_append(tmp_path):
    records = [rec(0, send=1.5, ttft=0.25, chunks=[1.75, 2.0], end=2.0, out=2),
               RequestRecord(series="a", model="m", url="u", request_id="x", scheduled_s=3.0, status="timeout",
                             error="slow, \"very\"\nslow")]
    path = tmp_path / "requests.csv"
    write_requests_csv(records[:1], path)
    append_requests_csv(records[1], path)
    back = read_requests_csv(path)
    assert back == records
    header = path.read_text().splitlines()[0].split(",")
    assert header[:5] == ["series", "model", "url", "request_id", "scheduled_s"] and "ttft_s" in header
    write_requests_csv(records, path)
    assert read_requests_csv(path) == records


def test_csv_writer_flushes_each_row(tmp_path):
    path = tmp_path / "requests.csv"
    r = rec(0, send=1.0, ttft=0.5, chunks=[1.5], end=1.5, out=1)
    with RequestsCsvWriter(path) as writer:
        writer(r)
        assert read_requests_csv(path) == [r], "on disk before the writer closes"
        writer(r)
    with RequestsCsvWriter(path) as writer:  # appending to an existing file writes no second header
        writer(r)
    assert len(read_requests_csv(path)) == 3

"""Arrival processes: rates, burstiness, determinism, traces and specs."""
import argparse
import itertools
import json
import math
import statistics

import pytest

from kvlab.load import arrivals
from kvlab.load.arrivals import ArrivalSpec, add_arrival_arguments, from_spec, spec_from_args


def take_until(gen, horizon):
    return list(itertools.takewhile(lambda t: t < horizon, gen))


def gaps(offsets):
    return [b - a for a, b in zip(offsets, offsets[1:])]


def test_constant_is_exact_and_starts_at_zero():
    offs = take_until(arrivals.constant(4.0), 2.0)
    assert offs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


@pytest.mark.parametrize("k", [0.25, 1.0, 4.0])
def test_gamma_mean_rate_and_cv(k):
    rate = 50.0
    g = gaps([0.0, *itertools.islice(arrivals.gamma(rate, k, seed=3), 20000)])
    mean = statistics.fmean(g)
    cv = statistics.pstdev(g) / mean
    # Loose statistical bounds: 20k samples put these within a few percent.
    assert mean == pytest.approx(1 / rate, rel=0.06)
    assert cv == pytest.approx(1 / math.sqrt(k), rel=0.1)


def test_poisson_is_gamma_with_shape_one_and_is_seeded():
    a = list(itertools.islice(arrivals.poisson(10, seed=1), 100))
    assert a == list(itertools.islice(arrivals.gamma(10, 1.0, seed=1), 100))
    assert a == list(itertools.islice(arrivals.poisson(10, seed=1), 100))
    assert a != list(itertools.islice(arrivals.poisson(10, seed=2), 100))
    assert all(b > a_ for a_, b in zip(a, a[1:]))


def test_bursts():
    assert list(arrivals.bursts(3, 2.0, count=2)) == [0.0, 0.0, 0.0, 2.0, 2.0, 2.0]
    assert take_until(arrivals.bursts(2, 1.5), 4.0) == [0.0, 0.0, 1.5, 1.5, 3.0, 3.0]


def test_ramp_counts_and_rate_grows_then_holds():
    offs = take_until(arrivals.ramp(10.0, 30.0, 10.0), 10.0)
    # Integral of the rate over the ramp: (10 + 30) / 2 * 10 = 200 requests.
    assert len(offs) == pytest.approx(200, abs=1)
    g = gaps(offs)
    assert g[0] == pytest.approx(1 / 10, rel=0.05) and g[-1] == pytest.approx(1 / 30, rel=0.05)
    assert all(x >= y - 1e-12 for x, y in zip(g, g[1:])), "gaps shrink while the rate grows"
    after = take_until(arrivals.ramp(10.0, 30.0, 10.0), 12.0)[len(offs):]
    assert len(after) == pytest.approx(60, abs=1)


def test_ramp_down():
    offs = take_until(arrivals.ramp(20.0, 0.0, 5.0), 100.0)
    assert len(offs) == pytest.approx(50, abs=1) and max(offs) <= 5.0


def test_trace_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("timestamp,prompt_tokens,output_tokens\n105.5,10,3\n100,20,4\n101.25,,\n")
    rows = arrivals.read_trace(csv_path)
    assert [r.timestamp for r in rows] == [100.0, 101.25, 105.5]
    assert rows[0].prompt_tokens == 20 and rows[1].prompt_tokens is None and rows[2].output_tokens == 3
    assert list(arrivals.trace(csv_path)) == [0.0, 1.25, 5.5]
    jl = tmp_path / "t.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"timestamp": 0.5, "prompt": "hi", "output_tokens": 2},
                                                    {"timestamp": 0.0, "prompt": "yo"}]))
    rows = arrivals.read_trace(jl)
    assert [r.prompt for r in rows] == ["yo", "hi"]
    assert list(arrivals.trace(jl)) == [0.0, 0.5]


def test_trace_without_timestamp_names_the_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt_tokens\n3\n")
    with pytest.raises(ValueError, match="timestamp"):
        arrivals.read_trace(bad)


@pytest.mark.parametrize("bad", [dict(kind="poisson"), dict(kind="bursts", burst_size=2),
                                 dict(kind="ramp", rate=1.0), dict(kind="trace"), dict(kind="nope", rate=1)])
def test_spec_validation(bad):
    with pytest.raises(ValueError):
        ArrivalSpec(**bad)


def test_spec_from_cli_flags():
    parser = argparse.ArgumentParser()
    add_arrival_arguments(parser)
    spec = spec_from_args(parser.parse_args(["--arrival", "gamma", "--rate", "8", "--burstiness", "0.5"]))
    assert spec == ArrivalSpec(kind="gamma", rate=8.0, burstiness=0.5)
    assert list(itertools.islice(from_spec(spec, seed=4), 5)) == list(itertools.islice(arrivals.gamma(8, 0.5, 4), 5))
    spec = spec_from_args(parser.parse_args(["--arrival", "bursts", "--burst-size", "4", "--burst-every", "2",
                                             "--burst-count", "1"]))
    assert list(spec.offsets()) == [0.0] * 4
    ramp = ArrivalSpec(kind="ramp", rate=1.0, end_rate=3.0)
    assert len(take_until(ramp.offsets(duration=10.0), 10.0)) == pytest.approx(20, abs=1)


@pytest.mark.parametrize("bad, words", [
    (dict(kind="constant", rate=-1.0), ["rate", "--rate"]),
    (dict(kind="poisson", rate=math.nan), ["rate"]),
    (dict(kind="gamma", rate=math.inf), ["rate"]),
    (dict(kind="gamma", rate=1.0, burstiness=0.0), ["burstiness", "--burstiness"]),
    (dict(kind="gamma", rate=1.0, burstiness=math.nan), ["burstiness"]),
    (dict(kind="bursts", burst_size=-2, burst_every=1.0), ["burst size", "--burst-size"]),
    (dict(kind="bursts", burst_size=2, burst_every=-1.0), ["--burst-every"]),
    (dict(kind="bursts", burst_size=2, burst_every=math.nan), ["--burst-every"]),
    (dict(kind="bursts", burst_size=2, burst_every=1.0, burst_count=-1), ["burst count", "--burst-count"]),
    (dict(kind="bursts", burst_size=2, burst_every=1.0, burst_count=0), ["--burst-count"]),
    (dict(kind="bursts", burst_size=2.5, burst_every=1.0), ["--burst-size", "whole number"]),
    (dict(kind="ramp", rate=1.0, end_rate=-3.0), ["--end-rate"]),
    (dict(kind="ramp", rate=1.0, end_rate=math.inf), ["--end-rate"]),
    (dict(kind="ramp", rate=1.0, end_rate=2.0, ramp_duration=-5.0), ["--ramp-duration"]),
    (dict(kind="constant", rate="fast"), ["rate", "number"]),
])
def test_spec_refuses_numbers_that_would_run_nothing_or_forever(bad, words):
    with pytest.raises(ValueError) as info:
        ArrivalSpec(**bad)
    for word in words:
        assert word in str(info.value)


def test_a_ramp_may_start_or_end_at_zero():
    assert ArrivalSpec(kind="ramp", rate=0.0, end_rate=2.0).rate == 0.0
    assert ArrivalSpec(kind="ramp", rate=2.0, end_rate=0.0).end_rate == 0.0


@pytest.mark.faults
@pytest.mark.parametrize("name, text, line, words", [
    ("t.csv", "timestamp,prompt_tokens\n0,3\nsoon,4\n", 3, ["timestamp", "'soon'"]),
    ("t.csv", "timestamp,prompt_tokens\n0,3\nnan,4\n", 3, ["finite"]),
    ("t.csv", "timestamp,prompt_tokens\n0,3\n1,1e400\n", 3, ["prompt_tokens"]),
    ("t.csv", "timestamp,prompt_tokens\n0,3\n1,-4\n", 3, ["prompt_tokens", ">= 1"]),
    ("t.csv", "timestamp,output_tokens\n0,3\n\n2,many\n", 4, ["output_tokens", "'many'"]),
    ("t.csv", "timestamp,prompt_tokens\n0,3\n,4\n", 3, ["no `timestamp`"]),
    ("t.jsonl", '{"timestamp": 0}\n\n[1, 2]\n', 3, ["not a JSON object"]),
    ("t.jsonl", '{"timestamp": 0}\n7\n', 2, ["not a JSON object"]),
    ("t.jsonl", '{"timestamp": 0}\n{"timestamp": "later"}\n', 2, ["timestamp"]),
    ("t.jsonl", '{"timestamp": 0}\n{"timestamp": Infinity}\n', 2, ["finite"]),
    ("t.jsonl", '{"timestamp": 0}\n{"timestamp": 1, "prompt": 42}\n', 2, ["prompt", "text"]),
    ("t.jsonl", '{"timestamp": 0}\n{"timestamp": 1, "output_tokens": -1}\n', 2, ["output_tokens", ">= 0"]),
    ("t.jsonl", '{"timestamp": 0}\n{"timestamp": 1,\n', 2, ["not a JSON object"]),
])
def test_a_bad_trace_line_names_the_file_and_the_line(tmp_path, name, text, line, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        arrivals.read_trace(path)
    message = str(info.value)
    assert f"{path}:{line}:" in message, message
    for word in words:
        assert word in message, message


@pytest.mark.faults
def test_a_trace_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"timestamp,prompt\n0,caf\xe9\n")
    with pytest.raises(ValueError, match=f"{path}.*not UTF-8"):
        arrivals.read_trace(path)

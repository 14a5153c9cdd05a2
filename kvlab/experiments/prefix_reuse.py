"""Static vs kvcached measured as users see it: servers in turn (ABBA blocks), fresh prompts and repeated ones.

What `kvlab bench elastic` runs by default and notebook 01's reuse phase shows. One server runs at a time, in
blocks ordered A B B A (static, kvcached, kvcached, static), so a drift of the machine over the run (thermal, a
neighbour's load) weighs on both modes alike. In each block, after a warm-up:

  * fresh: `requests` prompts never seen before, `concurrency` at a time (the raw cost of an elastic pool);
  * reuse: a prompt set sent once, then, after `pause_s` (longer than every kvcached timer), sent again and measured.
    A static pool serves the second pass from vLLM's prefix cache; kvcached does too while it retains the blocks.

Per mode and workload the summary has output tokens/s (the mean over the mode's blocks), TTFT p50/p99 and TPOT p50
(over all its measured requests), and the prefix-cache hit rate from vLLM's own counters (prompt tokens found in its
cache over prompt tokens sent). After the reuse pass each kvcached block reports what its idle engine holds: the
floor and the retained prefix cache (kvcached's record, via the stats endpoint).

`modes` maps a series name to (kvcached?, extra environment): the default compares static with kvcached; notebook 01
adds kvcached without retention (`KVCACHED_MAX_CACHED_TOKENS=0`) to show the trade-off between memory held and prefix
hits.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from kvlab.experiments.common import resolve_device
from kvlab.probes import HostTreeSource, KvcachedSource
from kvlab.probes.vllm_metrics import prompt_tokens_by_source, scrape
from kvlab.runs import Run

WORKLOADS = ("fresh", "reuse")
DEFAULT_MODES: dict[str, tuple[bool, dict[str, str]]] = {"static": (False, {}), "kvcached": (True, {})}
NO_RETENTION = {"KVCACHED_MAX_CACHED_TOKENS": "0"}


def block_order(modes: Sequence[str], repeats: int = 1) -> list[str]:
    """ABBA for two modes (A B C C B A for three), `repeats` times: each mode's blocks sit symmetrically in time."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    one = list(modes) + list(reversed(modes))
    return one * repeats


def elastic_abba(model: str, *, device: str = "auto", modes: Mapping[str, tuple[bool, Mapping[str, str]]] | None = None,
                 workloads: Sequence[str] = WORKLOADS, repeats: int = 1, symmetric: bool = True,
                 requests: int = 32, concurrency: int = 16,
                 prompt_tokens: int = 256, max_tokens: int = 128, pause_s: float = 3.0, kv_cache_gib: float = 2.0,
                 gpu_memory_utilization: float | None = None, server_args: Sequence[str] = (),
                 root: Path | str = "results", experiment: str = "elastic_abba", run_dir: Path | str | None = None,
                 seed: int = 0, progress: bool = True) -> Run:
    """Run the blocks (ABBA, or each mode once in order when not `symmetric`) and return the finished Run.

    summary.json: per mode the contract figures, and `workloads`: per workload and mode the throughput, latency and
    prefix-hit figures, with ratios against the first mode."""
    from kvlab.engines.server import VLLMServer

    modes = dict(DEFAULT_MODES if modes is None else modes)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        raise ValueError(f"workloads must be among {', '.join(WORKLOADS)}, got {list(workloads)}")
    if requests < 1 or concurrency < 1 or prompt_tokens < 1 or max_tokens < 1 or not 0 <= pause_s < 3600:
        raise ValueError("elastic_abba needs requests, concurrency, prompt_tokens and max_tokens >= 1 and "
                         "0 <= pause_s < 3600")
    device = resolve_device(device)
    # symmetric=False: each mode once, in order (a quick look, as notebook 01 takes; no drift correction).
    order = block_order(list(modes), repeats) if symmetric else list(modes) * repeats
    params = dict(model=str(model), device=device, modes={k: {"kvcached": v[0], "env": dict(v[1])}
                                                          for k, v in modes.items()},
                  workloads=list(workloads), order=order, requests=requests, concurrency=concurrency,
                  prompt_tokens=prompt_tokens, max_tokens=max_tokens, pause_s=pause_s, kv_cache_gib=kv_cache_gib,
                  gpu_memory_utilization=gpu_memory_utilization, server_args=list(server_args), seed=seed)
    run = Run(experiment, params, root=root, run_dir=run_dir)
    blocks: list[dict[str, Any]] = []
    with run:
        for index, mode in enumerate(order):
            kvcached, env = modes[mode]
            if progress:
                print(f"block {index + 1}/{len(order)}: {mode}", flush=True)
            server = VLLMServer(str(model), name=f"{mode}-{index + 1}", kvcached=kvcached, env=dict(env),
                                # On a GPU the pool is kv_cache_gib too, unless a share of the GPU sizes it.
                                kv_cache_gib=kv_cache_gib if device == "cpu" or gpu_memory_utilization is None
                                else None,
                                args=_gpu_args(device, gpu_memory_utilization) + list(server_args),
                                log_dir=run.dir / "logs", progress=progress)
            try:
                with run.phase("startup", series=mode):
                    server.start()
                run.note_engine(server)
                sources: list[Any] = [HostTreeSource(mode, server, pss_interval_s=None)]
                if kvcached:
                    sources.append(KvcachedSource(mode, server=server))
                with run.sampler(sources, interval_s=0.1):
                    blocks.append(_block(run, server, mode, index, workloads, requests=requests,
                                         concurrency=concurrency, prompt_tokens=prompt_tokens,
                                         max_tokens=max_tokens, pause_s=pause_s, seed=seed, kvcached=kvcached))
            finally:
                server.stop()
        run.finish({mode: _mode_summary(run, mode) for mode in modes},
                   workloads=summarize_blocks(blocks, list(modes), workloads), blocks=blocks, order=order)
    return run


def _mode_summary(run: Run, mode: str) -> dict[str, Any]:
    """The contract figures of one mode over its measured requests (all workloads, all blocks) and its memory."""
    from kvlab.load.metrics import summarize
    from kvlab.runs import memory_summary

    out: dict[str, Any] = dict(summarize([r for r in run.records if _mode_of(r.series) == mode]))
    out.update(memory_summary(run.memory(), mode, run.phases))
    return out


def _gpu_args(device: str, gpu_memory_utilization: float | None) -> list[str]:
    if device == "cuda" and gpu_memory_utilization is not None:
        return ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    return []


def _mode_of(series: str) -> str:
    return series.split("/", 1)[0]


def _block(run: Run, server: Any, mode: str, index: int, workloads: Sequence[str], *, requests: int,
           concurrency: int, prompt_tokens: int, max_tokens: int, pause_s: float, seed: int,
           kvcached: bool) -> dict[str, Any]:
    from kvlab.load.prompts import SyntheticPrompts

    def prompts(salt: int) -> list[str]:
        # Every block gets prompts of its own (fresh ones never repeat across blocks); `salt` tells passes apart.
        return SyntheticPrompts(prompt_tokens).take(requests, url=server.url, model=server.model_name,
                                                    seed=seed * 1_000_003 + index * 1000 + salt)

    block: dict[str, Any] = {"mode": mode, "index": index, "kvcached": kvcached}
    with run.phase("warmup", series=mode):
        _pass(None, server, prompts(999)[:concurrency], "warmup", concurrency, max_tokens)
    for workload in workloads:
        if workload == "fresh":
            measured = prompts(1)
        else:
            measured = prompts(2)
            with run.phase("reuse-first-pass", series=mode):
                _pass(None, server, measured, "warm", concurrency, max_tokens)
            time.sleep(pause_s)  # longer than every kvcached timer: what stays is what retention keeps
        before = _prompt_sources(server)
        with run.phase(workload, series=mode):
            records = _pass(run, server, measured, f"{mode}/{workload}", concurrency, max_tokens)
        after = _prompt_sources(server)
        block[workload] = _pass_figures(records, before, after)
    if kvcached:
        time.sleep(1.5)  # past the idle trim: what the idle engine holds now is its floor and its retained cache
        stats = server.kvcached_stats()
        block["idle_floor_bytes"] = stats.get("floor_bytes")
        block["idle_retained_bytes"] = stats.get("retained_bytes")
        block["idle_reserved_bytes"] = stats.get("reserved_bytes")
    server.check()
    return block


def _pass(run: Run | None, server: Any, prompts: list[str], series: str, concurrency: int,
          max_tokens: int) -> list[Any]:
    """Every prompt at t=0, `concurrency` in flight: a closed loop as `vllm bench serve --max-concurrency` runs."""
    from kvlab.load.workload import Target, run_workload

    target = Target(url=server.url, model=server.model_name, arrival=[0.0] * len(prompts), prompts=list(prompts),
                    max_tokens=max_tokens, series=series, ignore_eos=True, concurrency=concurrency)
    records = run_workload(target, None, on_record=run.record if run is not None else None, progress=False)
    failed = [r for r in records if not r.ok]
    if failed:
        server.check()
        raise RuntimeError(f"{len(failed)} of {len(records)} requests to {server.name} failed: {failed[0].error}")
    return list(records)


def _prompt_sources(server: Any) -> dict[str, float]:
    time.sleep(0.6)  # vLLM's stats loop publishes its counters a moment after the last request
    for _ in range(3):
        try:
            return prompt_tokens_by_source(scrape(server.url))
        except OSError:
            time.sleep(0.5)
    return {}


def _pass_figures(records: list[Any], before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    from kvlab.load.metrics import summarize

    s = summarize(records)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    sent = sum(delta.values())
    return {"requests": s["requests_ok"], "output_tokens_per_s": s["output_tokens_per_s"],
            "ttfts_s": [r.ttft_s for r in records if r.ttft_s is not None],
            "tpots_s": [r.tpot_s for r in records if r.tpot_s is not None],
            "prompt_tokens": sent, "prefix_hit_tokens": delta.get("local_cache_hit", 0.0),
            "computed_tokens": delta.get("local_compute", 0.0)}


def _percentile(values: Sequence[float], q: float) -> float | None:
    from kvlab.load.metrics import percentile

    return percentile(list(values), q)


def summarize_blocks(blocks: Sequence[Mapping[str, Any]], modes: Sequence[str],
                     workloads: Sequence[str]) -> dict[str, Any]:
    """Per workload and mode: mean tok/s over the mode's blocks, pooled TTFT p50/p99 and TPOT p50, prefix hit rate;
    and each mode's ratios against the first (the baseline)."""
    out: dict[str, Any] = {}
    for workload in workloads:
        per_mode: dict[str, Any] = {}
        for mode in modes:
            passes = [b[workload] for b in blocks if b["mode"] == mode and workload in b]
            if not passes:
                continue
            ttfts = [t for p in passes for t in p["ttfts_s"]]
            tpots = [t for p in passes for t in p["tpots_s"]]
            rates = [p["output_tokens_per_s"] for p in passes if p["output_tokens_per_s"]]
            sent = sum(p["prompt_tokens"] for p in passes)
            idle = [b for b in blocks if b["mode"] == mode and b.get("idle_reserved_bytes") is not None]
            per_mode[mode] = {
                "blocks": len(passes),
                "output_tokens_per_s": statistics.fmean(rates) if rates else None,
                "output_tokens_per_s_blocks": rates,
                "ttft_p50_s": _percentile(ttfts, 50), "ttft_p99_s": _percentile(ttfts, 99),
                "tpot_p50_s": _percentile(tpots, 50),
                "prefix_hit_rate": (sum(p["prefix_hit_tokens"] for p in passes) / sent) if sent else None,
                "prompt_tokens_computed": sum(p["computed_tokens"] for p in passes),
                "prompt_tokens_sent": sent,
                "idle_floor_bytes": max((b["idle_floor_bytes"] or 0 for b in idle), default=None),
                "idle_retained_bytes": max((b["idle_retained_bytes"] or 0 for b in idle), default=None),
            }
        base = per_mode.get(modes[0], {})
        for mode, figures in per_mode.items():
            if mode == modes[0]:
                continue
            figures["ratios"] = {
                "output_tokens_per_s": _ratio(figures["output_tokens_per_s"], base.get("output_tokens_per_s")),
                "ttft_p50": _ratio(figures["ttft_p50_s"], base.get("ttft_p50_s")),
                "ttft_p99": _ratio(figures["ttft_p99_s"], base.get("ttft_p99_s")),
                # Per-request decode speed, baseline TPOT over this mode's: above 1 is faster.
                "tpot_speed": _ratio(base.get("tpot_p50_s"), figures["tpot_p50_s"]),
            }
        out[workload] = per_mode
    return out


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

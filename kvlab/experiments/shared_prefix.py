"""Prefix sharing across engines: what notebook 04 and `kvlab bench prefix` run.

Three vLLM servers on one model: A and B share a kvcached prefix store, B-cold has none. For each long document,
A reads it first (document + A's question), then B asks another question about it (its document blocks come from
the store), B-cold asks the same (computing everything), and A asks B's question too (served from A's own prefix
cache). B's answer must equal A's: both stand on the KV that A computed. One request at a time, so each TTFT is
the prefill the engine did (or skipped).

The run directory has per series (A, B, B-cold, A-again) the contract figures, the prompt tokens each engine
computed, found in its own cache or loaded through the connector (vLLM's counters), and the store's size over time.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from kvlab.experiments.common import resolve_device, wait_alive
from kvlab.probes import HostTreeSource, NvmlSource, PrefixStoreSource
from kvlab.probes.vllm_metrics import prompt_tokens_by_source, scrape
from kvlab.runs import Run, memory_summary

SERIES = ("A", "B", "B-cold", "A-again")
QUESTION = "\n\nQuestion {n}: in one line, what does the text above say about the {topic}? Answer:"
TOPICS = ("river", "city", "garden", "music", "history", "school", "family", "window", "morning", "paper")


def question(n: int) -> str:
    return QUESTION.format(n=n, topic=TOPICS[n % len(TOPICS)])


def prefix_sharing(model: str, *, device: str = "auto", docs: int = 8, doc_tokens: int = 2000, max_tokens: int = 16,
                   store: str | None = None, store_max_bytes: int | None = None, kvcached: bool = False,
                   kv_cache_gib: float = 1.0, root: Path | str = "results", experiment: str = "prefix_sharing",
                   run_dir: Path | str | None = None, interval_s: float = 0.05, idle_s: float = 2.0, seed: int = 0,
                   server_args: Sequence[str] = (), progress: bool = True, figures: bool = True) -> Run:
    """Start A, B (sharing a prefix store) and B-cold, run the documents through them, return the finished Run.

    `store` defaults to a store of this run's own (under $KVCACHED_SHM_DIR/prefix), removed at the end; name an
    existing store or a shared directory to keep it. `kvcached=True` runs the three on elastic KV pools too."""
    from kvlab.engines.server import VLLMServer
    from kvlab.load.prompts import SyntheticPrompts

    if docs < 1 or doc_tokens < 32 or max_tokens < 1:
        raise ValueError("prefix_sharing needs docs >= 1, doc_tokens >= 32 and max_tokens >= 1")
    device = resolve_device(device)
    params = dict(model=str(model), device=device, docs=docs, doc_tokens=doc_tokens, max_tokens=max_tokens,
                  store=store, store_max_bytes=store_max_bytes, kvcached=kvcached, kv_cache_gib=kv_cache_gib,
                  idle_s=idle_s, seed=seed, server_args=list(server_args))
    run = Run(experiment, params, root=root, run_dir=run_dir)
    own_store = store is None
    store_name = store or f"kvlab-{run.run_id}"
    servers: dict[str, VLLMServer] = {}
    with run:
        try:
            common = dict(kvcached=kvcached, kv_cache_gib=kv_cache_gib, args=server_args, log_dir=run.dir / "logs",
                          progress=progress)
            for name, shared in (("A", True), ("B", True), ("B-cold", False)):
                servers[name] = VLLMServer(str(model), name=name, prefix_store=store_name if shared else None,
                                           prefix_store_max_bytes=store_max_bytes if shared else None, **common)
                with run.phase("startup", series=name):
                    servers[name].start()
                run.note_engine(servers[name])
            a = servers["A"]
            documents = SyntheticPrompts(doc_tokens).take(docs, url=a.url, model=a.model_name, seed=seed)
            sources = [HostTreeSource(n, s, pss_interval_s=None) for n, s in servers.items()]
            sources.append(PrefixStoreSource("store", _store_record_name(store_name)))
            if device == "cuda":
                sources.append(NvmlSource(series="gpu", processes=dict(servers)))
            counted = {"A": servers["A"], "B": servers["B"], "B-cold": servers["B-cold"]}
            tokens_before = {n: _sources(s) for n, s in counted.items()}
            texts: dict[str, list[str]] = {n: [] for n in SERIES}
            with run.sampler(sources, interval_s=interval_s):
                with run.phase("idle"):  # the servers' idle level, before any document
                    wait_alive(idle_s, *servers.values())
                for i, doc in enumerate(documents):
                    asks = (("A", "A", 2 * i), ("B", "B", 2 * i + 1), ("B-cold", "B-cold", 2 * i + 1),
                            ("A-again", "A", 2 * i + 1))
                    for series, server_name, q in asks:
                        with run.phase("ask", series=series):
                            record = _ask(run, servers[server_name], series, doc + question(q), max_tokens)
                        texts[series].append(record.text)
            tokens_after = {n: _sources(s) for n, s in counted.items()}
            summaries = _summaries(run, texts, tokens_before, tokens_after)
            exact = sum(b == a_again for b, a_again in zip(texts["B"], texts["A-again"]))
            b_cold = summaries["B-cold"].get("ttft_p50_s")
            b_store = summaries["B"].get("ttft_p50_s")
            run.finish(summaries, exact_matches=exact, documents=docs,
                       ttft_p50_ratio_store_vs_cold=(b_store / b_cold) if b_store and b_cold else None,
                       store=store_name)
        finally:
            for server in servers.values():
                server.stop()
            if own_store:
                from kvcached.prefix_store import remove_store

                remove_store(store_name)  # the run's own store goes with the run
    if figures:
        from kvlab.runs.plots import save_prefix_figures

        save_prefix_figures(run)
    return run


def _store_record_name(store: str) -> str:
    from kvcached.prefix_store import resolve

    return resolve(store)[0]


def _ask(run: Run, server: Any, series: str, prompt: str, max_tokens: int) -> Any:
    """One streamed request, alone on the server: its TTFT is the prefill this engine did."""
    from kvlab.load.workload import Target, run_workload

    target = Target(url=server.url, model=server.model_name, arrival=[0.0], prompts=[prompt], max_tokens=max_tokens,
                    series=series, ignore_eos=False, temperature=0.0)
    (record,) = run_workload(target, None, on_record=run.record, progress=False)
    server.check()
    if not record.ok:
        raise RuntimeError(f"{series}'s request failed: {record.error}")
    return record


def _sources(server: Any) -> dict[str, float]:
    for _ in range(3):  # the counters are updated by vLLM's stats loop: a moment after the last request
        try:
            return prompt_tokens_by_source(scrape(server.url))
        except OSError:
            time.sleep(0.5)
    return {}


def _summaries(run: Run, texts: dict[str, list[str]], before: dict[str, dict[str, float]],
               after: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for series in SERIES:
        summary = run.series_summary(series)
        if series == "A-again":  # A's second question per document: A's memory is the one that served it
            summary.update(memory_summary(run.memory(), "A", run.phases))
        ttfts = [r.ttft_s for r in run.records if r.series == series and r.ttft_s is not None]
        summary["ttft_per_document_s"] = ttfts
        summary["ttft_mean_s"] = statistics.fmean(ttfts) if ttfts else None
        out[series] = summary
    # Engine-wide counters: A's cover both of its series, so they are reported on "A".
    for name in ("A", "B", "B-cold"):
        b, a = before.get(name, {}), after.get(name, {})
        delta = {k: a.get(k, 0.0) - b.get(k, 0.0) for k in a}
        out[name]["prompt_tokens_computed"] = delta.get("local_compute")
        out[name]["prompt_tokens_local_cache"] = delta.get("local_cache_hit")
        out[name]["prompt_tokens_loaded"] = delta.get("external_kv_transfer")
    return out

"""Latency and throughput metrics of a workload, with vLLM's definitions (`vllm/benchmarks/serve.py`).

All times are seconds on the monotonic clock, measured by the client (see kvlab.load.workload):

- **TTFT** (time to first token) = first_token_s - send_s: from the moment the request was sent to the
  arrival of the first streamed chunk that carries `choices`. Streamed requests only.
- **e2e** (end-to-end latency) = end_s - send_s: from the send to the end of the response. (vLLM's
  benchmark stops at the last token chunk; the trailing usage chunk and `[DONE]` add microseconds.)
- **TPOT** (time per output token) = (e2e - TTFT) / (output_tokens - 1), per request, for requests with at
  least 2 output tokens. output_tokens is the server's `usage.completion_tokens`, never re-tokenized.
- **ITL** (inter-token latency) = the gaps between consecutive token chunks of a request, pooled over all
  requests. A chunk may carry several tokens, so ITL is per chunk, like vLLM's.
- **Goodput** = requests per second that completed OK *and* met every given SLO (TTFT, TPOT, e2e), over
  the same duration as the request rate. As in vLLM, a request with fewer than 2 output tokens has TPOT 0
  for the SLO check. Without an SLO goodput is None.
- **request_rate** = OK requests per second over the run's duration (vLLM's "request throughput");
  **output_tokens_per_s** = OK requests' output tokens per second over the same duration. The duration is
  from the first scheduled send to the last response's end, unless given.

Failed requests (status "error" or "timeout") are counted in requests_failed and kept out of every latency
percentile and token count: a fast error must not look like a fast answer.
Percentiles use linear interpolation (numpy's default, as vLLM).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from kvlab.load.records import RequestRecord

PERCENTILES = (50, 90, 99)
# Columns of requests.csv: the record's fields, then derived metrics for convenience in pandas.

@dataclass(frozen=True)
class SLO:
    """Service-level objectives in seconds; None means no objective on that metric."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    @classmethod
    def from_any(cls, slo: "SLO | Mapping[str, float] | None") -> "SLO | None":
        if slo is None or isinstance(slo, SLO):
            return slo
        unknown = set(slo) - {"ttft_s", "tpot_s", "e2e_s"}
        if unknown:
            raise ValueError(f"unknown SLO keys {sorted(unknown)}: use ttft_s, tpot_s, e2e_s (seconds)")
        return cls(**slo)

    def met_by(self, rec: RequestRecord) -> bool:
        if not rec.ok:
            return False
        if self.ttft_s is not None and (rec.ttft_s is None or rec.ttft_s > self.ttft_s):
            return False
        if self.tpot_s is not None and (rec.tpot_s or 0.0) > self.tpot_s:
            return False
        if self.e2e_s is not None and (rec.e2e_s is None or rec.e2e_s > self.e2e_s):
            return False
        return True

    def is_empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None and self.e2e_s is None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _stats(name: str, values: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"{name}_mean_s": (sum(values) / len(values)) if values else None}
    for q in PERCENTILES:
        out[f"{name}_p{q}_s"] = percentile(values, q)
    return out


def run_duration(records: Sequence[RequestRecord]) -> float | None:
    """First scheduled send to the last end, over all records."""
    starts = [r.scheduled_s for r in records]
    ends = [r.end_s for r in records if r.end_s is not None]
    if not starts or not ends:
        return None
    return max(ends) - min(starts)


def summarize(records: Sequence[RequestRecord], slo: SLO | Mapping[str, float] | None = None,
              duration_s: float | None = None) -> dict[str, Any]:
    """Counts, latency percentiles (OK requests only), rates and goodput of a set of records."""
    slo = SLO.from_any(slo)
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    duration = duration_s if duration_s is not None else run_duration(records)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    itl = [gap for r in ok for gap in r.itl_s]
    lag = [r.send_lag_s for r in records if r.send_lag_s is not None]
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    per_s = (lambda x: x / duration) if duration and duration > 0 else (lambda x: None)
    summary: dict[str, Any] = {
        "requests": len(records),
        "requests_ok": len(ok),
        "requests_failed": len(failed),
        "failures": {s: sum(1 for r in failed if r.status == s) for s in ("error", "timeout")},
        "duration_s": duration,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_rate": per_s(len(ok)),
        "output_tokens_per_s": per_s(out_tokens),
    }
    summary.update(_stats("ttft", ttft))
    summary.update(_stats("tpot", tpot))
    summary.update(_stats("itl", itl))
    summary.update(_stats("latency", e2e))
    summary["send_lag_p99_s"] = percentile(lag, 99)
    if slo is not None and not slo.is_empty():
        good = sum(1 for r in records if slo.met_by(r))
        summary["slo"] = {k: v for k, v in vars(slo).items() if v is not None}
        summary["good_requests"] = good
        summary["goodput"] = per_s(good)
    else:
        summary["good_requests"] = None
        summary["goodput"] = None
    return summary


def summarize_by_series(records: Iterable[RequestRecord], slo: SLO | Mapping[str, float] | None = None,
                        ) -> dict[str, dict[str, Any]]:
    """`summarize` per series, in order of first appearance."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(r.series, []).append(r)
    return {name: summarize(recs, slo) for name, recs in groups.items()}

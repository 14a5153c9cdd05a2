"""KV cache usage and request queue lengths, scraped from a vLLM server's Prometheus endpoint."""
from __future__ import annotations

import urllib.request

from kvlab.probes.protocol import Probe, Reading

# vLLM metric name -> our metric name. v1 calls KV usage kv_cache_usage_perc (a fraction despite the name);
# older releases called it gpu_cache_usage_perc.
_PROM_METRICS = {
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
    "vllm:num_requests_running": "requests_running",
    "vllm:num_requests_waiting": "requests_waiting",
}


def parse_prometheus(text: str, wanted: dict[str, str] = _PROM_METRICS) -> dict[str, float]:
    """Sum each wanted metric over its label sets, from Prometheus text exposition format."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        ours = wanted.get(line[:name_end])
        if ours is None:
            continue
        # The value follows the labels (which may contain spaces inside quotes); an optional timestamp follows it.
        rest = line[line.rfind("}") + 1:] if "{" in line[:name_end + 1] else line[name_end:]
        fields = rest.split()
        if not fields:
            continue
        try:
            out[ours] = out.get(ours, 0.0) + float(fields[0])
        except ValueError:
            continue
    return out


# Where prompt tokens came from (vLLM v1): computed here, the local prefix cache, or a KV connector (external).
PROMPT_TOKEN_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")


def prompt_tokens_by_source(text: str) -> dict[str, float]:
    """`vllm:prompt_tokens_by_source` per source (summed over engines), from Prometheus text: how many prompt tokens
    an engine computed, found in its own prefix cache, or loaded through a KV connector."""
    out = {source: 0.0 for source in PROMPT_TOKEN_SOURCES}
    for line in text.splitlines():
        name = line.partition("{")[0]
        if name not in ("vllm:prompt_tokens_by_source_total", "vllm:prompt_tokens_by_source"):
            continue  # not `_created` (a timestamp), nor another metric that starts the same
        labels, _, rest = line.partition("}")
        for source in PROMPT_TOKEN_SOURCES:
            if f'source="{source}"' in labels:
                try:
                    out[source] += float(rest.split()[0])
                except (IndexError, ValueError):
                    pass
    return out


def scrape(url: str, timeout_s: float = 5.0) -> str:
    """The text of a vLLM server's /metrics (OSError when it does not answer)."""
    from kvlab.load.client import root_url

    with urllib.request.urlopen(root_url(url) + "/metrics", timeout=timeout_s) as resp:
        return resp.read().decode(errors="replace")


class VllmMetricsSource:
    """KV cache usage and running/waiting requests scraped from a vLLM server's `/metrics` (~2 Hz).

    A scrape that fails (server starting or gone) gives no sample rather than stopping the sampler.
    """

    def __init__(self, series: str, url: str, *, interval_s: float = 0.5, timeout_s: float = 2.0) -> None:
        from kvlab.load.client import root_url

        self.series = series
        self.url = root_url(url) + "/metrics"
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.errors = 0

    def read(self) -> list[Reading]:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as resp:
                text = resp.read().decode(errors="replace")
        except OSError:
            self.errors += 1
            return []
        return [(self.series, k, v) for k, v in parse_prometheus(text).items()]

    def probes(self) -> list[Probe]:
        return [self]

"""kvlab: the experiment lab for LLM serving memory (servers, workloads, probes, results, plots, router)."""
__version__ = "0.1.0"

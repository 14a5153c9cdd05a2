"""KVCachedPrefixConnector: vLLM's KV connector over a kvcached prefix store, so one engine reuses the prompt-prefix
KV another engine computed (a long document read once, asked about many times, by any engine on the store).

    --kv-transfer-config '{"kv_connector": "KVCachedPrefixConnector",
                           "kv_connector_module_path": "kvcached.integration.vllm_prefix_connector",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"store": "<name or directory>", "max_bytes": <int>}}'

Scheduler side: the leading full blocks of a prompt found in the store, beyond what the local prefix cache holds,
count as computed (whole blocks; the prompt's last token is always computed, it yields the first output token).
Worker side: before the step, the chunks of those blocks are read straight into the blocks vLLM allocated; after the
step, the prompt's full blocks the step completed are saved, unless the store has them. Loads and saves copy whole
blocks of every layer, so the same code serves the CPU layout and the GPU ones (a block is one slice of each layer's
tensor; on a device the bytes go through a host buffer).

A store that is missing, full or unreadable never fails a request: a miss, a skipped save, or a block reported as
not loaded (vLLM then computes it, `kv_load_failure_policy` "recompute", which this connector asks for).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvcached.integration.vllm.plugin import configure_logging
from kvcached.prefix_blocks import BlockCopier
from kvcached.prefix_store import PrefixStore, chain_keys, model_fingerprint

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger("kvcached")

CONNECTOR_NAME = "KVCachedPrefixConnector"


@dataclass
class PrefixConnectorMetadata(KVConnectorMetadata):
    """What the workers do around one step: blocks to fill from the store, and blocks to save to it."""

    loads: list[tuple[int, str]] = field(default_factory=list)  # (block id, chunk key)
    saves: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class _Request:
    """The scheduler side's view of one request: its prompt's keys and blocks, and how far it has saved."""

    prompt: list[int]
    keys: list[str]
    block_ids: list[int] = field(default_factory=list)
    local_tokens: int = 0  # block-aligned local prefix-cache hit, as the scheduler last told us
    saved_blocks: int = 0  # prompt blocks [0, saved_blocks) are in the store or were sent to be saved
    computed: int = 0  # tokens computed after the last scheduled step


class KVCachedPrefixConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        configure_logging()
        transfer = vllm_config.kv_transfer_config
        # A block the store could not give back must be computed, never fail its request.
        transfer.kv_load_failure_policy = "recompute"
        extra = transfer.kv_connector_extra_config or {}
        store = extra.get("store")
        if not isinstance(store, str) or not store:
            raise ValueError(f'{CONNECTOR_NAME} needs kv_connector_extra_config {{"store": "<name or directory>"}}')
        max_bytes = extra.get("max_bytes")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"{CONNECTOR_NAME}: max_bytes must be a whole number of bytes, got {max_bytes!r}")
        groups = kv_cache_config.kv_cache_groups
        self._enabled = len(groups) == 1 and vllm_config.parallel_config.tensor_parallel_size == 1
        if not self._enabled:
            logger.warning("kvcached: %s shares single-spec models on one worker only (tensor parallelism and "
                           "hybrid models compute every prefix themselves)", CONNECTOR_NAME)
        spec = groups[0].kv_cache_spec
        self._layers = list(groups[0].layer_names)
        self._block_size = int(spec.block_size)
        self._part_bytes = int(spec.page_size_bytes)  # one block of one layer
        model = vllm_config.model_config
        fingerprint = model_fingerprint(
            model=str(extra.get("model_id") or model.model), dtype=str(spec.dtype), layers=len(self._layers),
            kv_heads=getattr(spec, "num_kv_heads", None), head_size=getattr(spec, "head_size", None),
            block_size=self._block_size, block_bytes=self._part_bytes, kind=type(spec).__name__)
        self._store: PrefixStore | None = None
        try:
            self._store = PrefixStore.open(store, fingerprint, max_bytes=max_bytes)
        except (OSError, ValueError) as exc:
            logger.warning("kvcached: prefix store %r unusable (%s): this engine computes every prefix", store, exc)
        # Scheduler side.
        self._requests: dict[str, _Request] = {}
        self._pending_loads: list[tuple[int, str]] = []
        # Worker side.
        self._kv_caches: list[torch.Tensor] = []
        self._copier: BlockCopier | None = None
        self._failed_loads: set[int] = set()
        self.loaded_blocks = 0
        self.saved_blocks = 0
        if role == KVConnectorRole.SCHEDULER and self._store is not None:
            # The model's chunks live under <root>/<fingerprint>; the block size fixes how prompts are chunked.
            logger.info("kvcached: %s on prefix store %s (%s), model fingerprint %s, %d-token blocks",
                        CONNECTOR_NAME, self._store.name, self._store.root, fingerprint, self._block_size)

    # ---- scheduler side -------------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._enabled or self._store is None:
            return 0, False
        state = self._state(request)
        state.local_tokens = num_computed_tokens
        # Never the whole prompt: its last token is computed, it gives the first output token.
        usable = (len(state.prompt) - 1) // self._block_size
        try:
            hits = self._store.leading_hits(state.keys[:usable], self._part_bytes, len(self._layers))
        except OSError:
            return 0, False
        matched = hits * self._block_size
        return max(0, matched - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if not self._enabled or self._store is None:
            return
        state = self._state(request)
        state.block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens <= 0:
            return
        first = state.local_tokens // self._block_size
        last = first + num_external_tokens // self._block_size
        self._pending_loads += [(state.block_ids[i], state.keys[i]) for i in range(first, last)]
        state.saved_blocks = max(state.saved_blocks, last)  # what was loaded is in the store already

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = PrefixConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        if not self._enabled or self._store is None:
            return meta
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
                meta.saves += self._saves(state, new.num_computed_tokens, scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    state.block_ids = list(new_ids[0])  # a resumed request gets all its blocks anew
                else:
                    state.block_ids += list(new_ids[0])
            meta.saves += self._saves(state, cached.num_computed_tokens[i], scheduled.get(req_id, 0))
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        return False, None

    def _state(self, request: Request) -> _Request:
        state = self._requests.get(request.request_id)
        if state is None:
            prompt = list(request.prompt_token_ids or [])
            state = _Request(prompt=prompt, keys=chain_keys(self._store.fingerprint, prompt, self._block_size))
            self._requests[request.request_id] = state
        return state

    def _saves(self, state: _Request, computed_before: int, scheduled: int) -> list[tuple[int, str]]:
        """The prompt's full blocks this step completes that the store does not have yet."""
        if computed_before < state.computed:
            # vLLM went back (a block failed to load, or the request was preempted): what it computes again is
            # saved again where the store lacks it (a chunk that failed its check was removed).
            state.saved_blocks = min(state.saved_blocks, computed_before // self._block_size)
        computed_after_step = computed_before + scheduled
        state.computed = computed_after_step
        done = min(computed_after_step, len(state.prompt)) // self._block_size
        done = min(done, len(state.keys), len(state.block_ids))
        out = []
        for i in range(state.saved_blocks, done):
            if not self._has(state.keys[i]):
                out.append((state.block_ids[i], state.keys[i]))
        state.saved_blocks = max(state.saved_blocks, done)
        return out

    def _has(self, key: str) -> bool:
        assert self._store is not None
        try:
            return self._store.leading_hits([key], self._part_bytes, len(self._layers)) == 1
        except OSError:
            return False

    # ---- worker side ----------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = [kv_caches[name] for name in self._layers if name in kv_caches]
        if len(self._kv_caches) != len(self._layers):
            logger.warning("kvcached: %s got %d of %d layers' KV caches: sharing off", CONNECTOR_NAME,
                           len(self._kv_caches), len(self._layers))
            self._enabled = False
            return
        num_blocks = self._kv_cache_config.num_blocks
        shape = self._kv_caches[0].shape
        # The block dimension: first on CPU ([blocks, heads, block_size, 2 * head_size]); second in layouts that
        # keep K and V apart first ([2, blocks, ...]).
        dims = [d for d in range(len(shape)) if shape[d] == num_blocks]
        if not dims:
            logger.warning("kvcached: %s cannot find the block dimension in %s: sharing off", CONNECTOR_NAME, shape)
            self._enabled = False
            return
        one = self._kv_caches[0].select(dims[0], 0)
        if one.numel() * one.element_size() != self._part_bytes:
            logger.warning("kvcached: %s: a block of one layer holds %d bytes, not %d: sharing off", CONNECTOR_NAME,
                           one.numel() * one.element_size(), self._part_bytes)
            self._enabled = False
            return
        if self._store is not None:
            self._copier = BlockCopier(self._kv_caches, dims[0], self._part_bytes)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, PrefixConnectorMetadata) or not meta.loads or self._copier is None:
            return
        for block_id, key in meta.loads:
            if self._copier.load(self._store, key, block_id):
                self.loaded_blocks += 1
            else:
                self._failed_loads.add(block_id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole blocks of every layer, done before the step starts

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saves are whole blocks of every layer, done once the step has written them (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, PrefixConnectorMetadata) or not meta.saves or self._copier is None:
            return
        for block_id, key in meta.saves:
            if self._copier.save(self._store, key, block_id):
                self.saved_blocks += 1

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_loads = self._failed_loads, set()
        return failed

"""vLLM 0.34's own extensible KV cache, beside kvcached.

0.34 is a GPU-only wheel pinning torch 2.14, so it cannot be imported here: the config class and the allocator's call
shape are TEST DOUBLES copied from its source (`vllm/config/vllm.py:_resolve_extensible_kv_cache`,
`vllm/v1/worker/utils.py:allocate_kv_cache`); tests/unit/test_vllm_versions.py checks statically that both targets
are where the doubles assume.
"""
from __future__ import annotations

import types

import pytest

from kvcached.integration.vllm import patches
from kvcached.integration.vllm import worker as vllm_worker


def _config_module():
    """TEST DOUBLE of vllm.config.vllm in 0.34: unset, the extensible KV cache turns itself on where supported."""
    module = types.ModuleType("vllm_config_034_double")

    class VllmConfig:
        def __init__(self, requested):
            self.cache_config = types.SimpleNamespace(enable_extensible_kv_cache=requested,
                                                      _extensible_kv_cache_resolved=False)
            self._resolve_extensible_kv_cache()

        def _resolve_extensible_kv_cache(self):
            cache_config = self.cache_config
            if cache_config._extensible_kv_cache_resolved:
                return
            cache_config._extensible_kv_cache_resolved = True
            if cache_config.enable_extensible_kv_cache is None:
                cache_config.enable_extensible_kv_cache = True  # "on where supported if unset" (CUDA)

    module.VllmConfig = VllmConfig
    return module


def test_kvcached_turns_vllms_default_off_and_leaves_an_explicit_choice_alone():
    module = _config_module()
    patches._patch_extensible_kv_cache(module)
    patches._patch_extensible_kv_cache(module)  # plugins load more than once: patched once
    assert module.VllmConfig(None).cache_config.enable_extensible_kv_cache is False
    assert module.VllmConfig(True).cache_config.enable_extensible_kv_cache is True
    assert module.VllmConfig(False).cache_config.enable_extensible_kv_cache is False


def test_a_release_without_it_is_left_as_it_is():
    module = types.ModuleType("vllm_config_032_double")
    module.VllmConfig = type("VllmConfig", (), {})
    patches._patch_extensible_kv_cache(module)
    assert not hasattr(module.VllmConfig, "_resolve_extensible_kv_cache")


def test_when_vllms_allocator_backs_the_pool_kvcached_keeps_its_hands_off(monkeypatch):
    """With --enable-extensible-kv-cache, vLLM passes allocate=: the engine keeps that allocation, and no kvcached
    region is made (the scheduler then finds no pool file and keeps vLLM's own block pool)."""
    torch = pytest.importorskip("torch", reason="torch comes with vLLM: run `make setup`")
    calls = []

    def allocate_kv_cache(kv_cache_config, device, layout, kernel_block_sizes=None, allocate=None):
        calls.append(allocate)
        return {"layer": allocate(64) if allocate else torch.zeros(64, dtype=torch.int8)}

    regions = len(vllm_worker._regions)
    elastic = vllm_worker.elastic_allocate_kv_cache(allocate_kv_cache, types.SimpleNamespace(torch=torch))
    owned = torch.ones(64, dtype=torch.int8)
    out = elastic(object(), torch.device("cpu"), None, None, allocate=lambda size: owned)
    assert out["layer"] is owned and len(calls) == 1
    assert len(vllm_worker._regions) == regions

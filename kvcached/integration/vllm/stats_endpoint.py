"""`GET /kvcached/stats` on a vLLM server (entry point `vllm.endpoint_plugins: kvcached_stats`).

vLLM loads endpoint plugins only when they are named in VLLM_PLUGINS, and then loads only the named general
plugins too, so enable both: `VLLM_PLUGINS=kvcached,kvcached_stats` (kvlab's VLLMServer does this). The numbers
come from kvcached's shared-memory records, which the scheduler process keeps current; the API server only reads.
"""
from __future__ import annotations

import os
from argparse import Namespace
from typing import Any


def instance_stats(instance: str) -> dict[str, Any]:
    """The engine's budget record, found by its exact name (never by prefix: `kva` must not report `kvab`)."""
    from kvcached.budget import find_instance

    try:
        records = [find_instance(instance)]
    except KeyError:
        return {"enabled": False, "instance": instance, "instances": []}
    return {
        "enabled": True,
        "instance": instance,
        "used_bytes": sum(r.used_bytes for r in records),
        "reserved_bytes": sum(r.reserved_bytes for r in records),
        # What an idle engine holds: its floor, and the prefix cache it keeps until someone needs the memory.
        "floor_bytes": sum(r.floor_bytes for r in records),
        "retained_bytes": sum(r.retained_bytes for r in records),
        "limit_bytes": sum(r.limit_bytes for r in records),
        "effective_limit_bytes": sum(r.effective_limit_bytes for r in records),
        "virtual_bytes": sum(r.virtual_bytes for r in records),
        "used_pages": sum(r.used_pages for r in records),
        "reserved_pages": sum(r.reserved_pages for r in records),
        "instances": [r.to_dict() for r in records],
    }


class KVCachedStatsPlugin:
    name = "kvcached_stats"
    required_tasks = None

    def attach_router(self, app: Any) -> None:
        from fastapi.responses import JSONResponse

        @app.get("/kvcached/stats")
        async def kvcached_stats() -> JSONResponse:  # noqa: D401 - route
            instance = os.environ.get("KVCACHED_INSTANCE", "")
            if not instance:
                return JSONResponse({"enabled": False, "instance": None, "instances": []})
            return JSONResponse(instance_stats(instance))

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        return None


def make_plugin() -> KVCachedStatsPlugin:
    return KVCachedStatsPlugin()

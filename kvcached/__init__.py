"""kvcached: an elastic KV cache. Virtual address space for the whole pool, physical pages only for live blocks.

Public names are imported lazily so `import kvcached` stays cheap (and never imports torch).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "KVLayout": "kvcached.layout",
    "PageAllocator": "kvcached.page_allocator",
    "KVCacheManager": "kvcached.kv_cache_manager",
    "KVCacheStats": "kvcached.kv_cache_manager",
    "BudgetRecord": "kvcached.budget",
    "InstanceInfo": "kvcached.budget",
    "list_instances": "kvcached.budget",
    "parse_size": "kvcached.units",
    "format_size": "kvcached.units",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvcached' has no attribute {name!r}")

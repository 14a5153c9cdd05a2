"""The only code that knows an engine's internals, one subpackage per engine (today `vllm`).

Engine-agnostic helpers (`import_hooks`) live here; everything an engine's subpackage needs from kvcached's core
(layout, allocator, KV cache manager, budgets) it imports from there, never the other way round.
"""

"""kvcached: an elastic KV cache. Virtual address space for the whole pool, physical pages only for live blocks."""
__version__ = "0.1.0"

"""Where each KV block lives in the region, and which region pages a block needs.

vLLM keeps the whole pool in one layer-major buffer: layer l of block b lives at
`l * layer_stride + b * block_bytes`. A block therefore touches the same page offset in every layer,
so the unit the allocator commits is a *logical page*: page g of every layer at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PAGE_SIZE = 2 << 20


@dataclass(frozen=True)
class KVLayout:
    """Geometry of one KV pool: `num_blocks` blocks of `block_bytes` per layer, `num_layers` layers."""

    num_blocks: int
    block_bytes: int
    num_layers: int = 1
    page_size: int = DEFAULT_PAGE_SIZE
    layer_stride: int | None = None
    _stride: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_bytes", "num_layers", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive integer, got {value!r}")
        layer_bytes = self.num_blocks * self.block_bytes
        stride = self.layer_stride
        if stride is None:
            stride = -(-layer_bytes // self.page_size) * self.page_size
        if stride % self.page_size:
            raise ValueError(
                f"layer_stride {stride} is not a multiple of page_size {self.page_size}: round the per-layer "
                f"allocation up to a page, e.g. layer_stride={-(-stride // self.page_size) * self.page_size}")
        if stride < layer_bytes:
            raise ValueError(
                f"layer_stride {stride} is smaller than one layer ({self.num_blocks} blocks x {self.block_bytes} B "
                f"= {layer_bytes} B): raise layer_stride or lower num_blocks")
        object.__setattr__(self, "_stride", stride)

    @property
    def stride(self) -> int:
        """Bytes between the starts of two consecutive layers."""
        return self._stride

    @property
    def pages_per_layer(self) -> int:
        return self._stride // self.page_size

    @property
    def region_size(self) -> int:
        """Virtual bytes the region must reserve for the whole pool."""
        return self.num_layers * self._stride

    @property
    def num_logical_pages(self) -> int:
        """Logical pages that hold at least one block (the tail of a stride past the last block holds none)."""
        return -(-(self.num_blocks * self.block_bytes) // self.page_size)

    @property
    def logical_page_bytes(self) -> int:
        """Physical bytes one logical page commits: one page in every layer."""
        return self.num_layers * self.page_size

    @property
    def blocks_per_page(self) -> float:
        """Blocks per logical page; below 1 when a block spans several pages."""
        return self.page_size / self.block_bytes

    def pages_of_block(self, block: int) -> range:
        """Logical pages block `block` touches."""
        self._check_block(block)
        first = block * self.block_bytes // self.page_size
        last = ((block + 1) * self.block_bytes - 1) // self.page_size
        return range(first, last + 1)

    def blocks_of_page(self, page: int) -> range:
        """Blocks that touch logical page `page` (a block straddling two pages appears in both)."""
        self._check_page(page)
        first = page * self.page_size // self.block_bytes
        last = min(((page + 1) * self.page_size - 1) // self.block_bytes, self.num_blocks - 1)
        return range(first, last + 1)

    def region_pages(self, page: int) -> list[int]:
        """Region page indices (page_size units from the region start) that make up logical page `page`."""
        self._check_page(page)
        per_layer = self.pages_per_layer
        return [layer * per_layer + page for layer in range(self.num_layers)]

    def blocks_in_bytes(self, num_bytes: int) -> int:
        """How many whole blocks `num_bytes` of physical memory can hold (at least, ignoring straddling)."""
        pages = max(num_bytes, 0) // self.logical_page_bytes
        return pages * self.page_size // self.block_bytes

    def _check_block(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} is outside the pool (0..{self.num_blocks - 1})")

    def _check_page(self, page: int) -> None:
        if not 0 <= page < self.num_logical_pages:
            raise IndexError(f"logical page {page} is outside the pool (0..{self.num_logical_pages - 1})")

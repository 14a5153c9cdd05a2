import pytest

from kvcached.layout import KVLayout

P = 4096


def test_blocks_smaller_than_a_page():
    lay = KVLayout(num_blocks=10, block_bytes=1024, num_layers=3, page_size=P)
    assert lay.blocks_per_page == 4
    assert lay.num_logical_pages == 3
    assert lay.logical_page_bytes == 3 * P
    assert lay.stride == 3 * P and lay.region_size == 9 * P
    assert list(lay.pages_of_block(5)) == [1]
    assert list(lay.blocks_of_page(2)) == [8, 9]
    assert lay.region_pages(1) == [1, 4, 7]


def test_blocks_larger_than_a_page():
    lay = KVLayout(num_blocks=4, block_bytes=3 * P, num_layers=2, page_size=P)
    assert lay.num_logical_pages == 12
    assert list(lay.pages_of_block(1)) == [3, 4, 5]
    assert list(lay.blocks_of_page(4)) == [1]
    assert lay.region_pages(11) == [11, 23]


def test_blocks_straddling_pages():
    lay = KVLayout(num_blocks=5, block_bytes=3 * P // 2, page_size=P)
    assert list(lay.pages_of_block(1)) == [1, 2]
    assert list(lay.blocks_of_page(1)) == [0, 1]
    # Every byte of every block is covered by the pages reported for it.
    for b in range(lay.num_blocks):
        pages = lay.pages_of_block(b)
        assert pages[0] * P <= b * lay.block_bytes and (b + 1) * lay.block_bytes <= (pages[-1] + 1) * P
        for g in pages:
            assert b in lay.blocks_of_page(g)


def test_explicit_layer_stride():
    lay = KVLayout(num_blocks=4, block_bytes=1024, num_layers=2, page_size=P, layer_stride=4 * P)
    assert lay.pages_per_layer == 4
    assert lay.region_pages(0) == [0, 4]
    assert lay.num_logical_pages == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer_stride=P + 1), "multiple of page_size"),
    (dict(layer_stride=P, num_blocks=8), "smaller than one layer"),
    (dict(num_layers=0), "positive"),
    (dict(block_bytes=-1), "positive"),
])
def test_invalid_layouts_say_what_to_change(kwargs, match):
    args = dict(num_blocks=4, block_bytes=1024, page_size=P) | kwargs
    with pytest.raises(ValueError, match=match):
        KVLayout(**args)


def test_out_of_range_indices():
    lay = KVLayout(num_blocks=4, block_bytes=1024, page_size=P)
    with pytest.raises(IndexError):
        lay.pages_of_block(4)
    with pytest.raises(IndexError):
        lay.region_pages(1)

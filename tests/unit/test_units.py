import pytest

from kvcached.units import format_size, parse_percent, parse_size


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), ("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29), ("64KB", 64 << 10),
    ("2g", 2 << 30), (" 1 T ", 1 << 40), ("0", 0), (".5K", 512), (7, 7),
])
def test_parse_size_accepts_common_spellings(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12X", "-1G", "", "G", "1.2.3M", "nan", "inf", "-5", True])
def test_parse_size_rejects_with_a_hint(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_negative_size_says_so():
    with pytest.raises(ValueError, match="negative"):
        parse_size("-1G")
    with pytest.raises(ValueError, match="negative"):
        parse_size(-3)


def test_parse_percent():
    assert parse_percent("50") == 50.0
    assert parse_percent("12.5%") == 12.5
    for bad in ("-1", "101", "abc", "nan"):
        with pytest.raises(ValueError, match="percentage"):
            parse_percent(bad)


def test_format_size():
    assert format_size(0) == "0B"
    assert format_size(1536) == "1.5K"
    assert format_size(2 << 30) == "2.0G"

"""Byte sizes as people type them (`512M`, `2G`, `1.5GiB`) and as tables show them.

Every suffix is binary (K = 1024): memory pages, GPU memory and `VLLM_CPU_KVCACHE_SPACE` all count in
powers of two, so `2G` and `2GiB` meaning the same thing avoids an off-by-7% surprise.

Sizes are parsed exactly (decimal arithmetic, never a float) and must fit the records' int64: 0..2^63-1 bytes.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal

MAX_BYTES = (1 << 63) - 1
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(?P<num>\d{1,30}(?:\.\d{0,30})?|\.\d{1,30})\s*(?P<unit>[KMGTPE]?)(?:I?B)?\s*$",
                      re.IGNORECASE)
_EXAMPLES = "e.g. 512M, 2G or 1.5GiB"


def parse_size(text: str | int) -> int:
    """Parse `512M`, `2G`, `1.5GiB`, `4096`, `64KB` into bytes (binary units).

    ValueError that shows an accepted spelling for input such as `12X`, `-1G`, `nan`, `inf`, or a size past
    2^63-1 bytes (`16384P`): the records hold int64, and a wrapped value would be a limit nobody asked for.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}: give bytes or a number with K/M/G/T, {_EXAMPLES}")
    if isinstance(text, int):
        value = text
    elif isinstance(text, float):
        if not math.isfinite(text) or not text.is_integer():
            raise ValueError(f"invalid size {text!r}: give a whole number of bytes or a size like 2G")
        value = int(text)
    else:
        raw = str(text).strip()
        if raw.startswith("-"):
            raise ValueError(f"invalid size {raw!r}: sizes cannot be negative")
        match = _SIZE_RE.match(raw)
        if not match:
            raise ValueError(f"invalid size {raw[:40]!r}: give bytes or a number with K/M/G/T, {_EXAMPLES}")
        value = int(Decimal(match["num"]) * _UNITS[match["unit"].upper()])
        text = raw
    if value < 0:
        raise ValueError(f"invalid size {text!r}: sizes cannot be negative")
    if value > MAX_BYTES:
        raise ValueError(f"invalid size {text!r}: more than 2^63-1 bytes (8E), the largest size kvcached can hold")
    return value


def parse_percent(text: str | float) -> float:
    """Parse `50`, `50%` or `12.5` into a percentage in [0, 100]."""
    raw = str(text).strip().rstrip("%").strip()
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"invalid percentage {str(text).strip()!r}: give a number from 0 to 100, "
                         "e.g. 50 or 50%") from None
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise ValueError(f"invalid percentage {str(text).strip()!r}: give a number from 0 to 100")
    return value


def format_size(num_bytes: int | float) -> str:
    """Short human size with binary units: 1536 -> '1.5K', 2147483648 -> '2.0G'."""
    value = float(num_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "K", "M", "G", "T", "P", "E"):
        if value < 1024 or unit == "E":
            return f"{sign}{int(value)}{unit}" if unit == "B" else f"{sign}{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")

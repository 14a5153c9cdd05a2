"""Byte sizes as people type them (`512M`, `2G`, `1.5GiB`) and as tables show them.

Every suffix is binary (K = 1024): memory pages, GPU memory and `VLLM_CPU_KVCACHE_SPACE` all count in
powers of two, so `2G` and `2GiB` meaning the same thing avoids an off-by-7% surprise.
"""
from __future__ import annotations

import math
import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse `512M`, `2G`, `1.5GiB`, `4096`, `64KB` into bytes (binary units).

    Raises ValueError that shows an accepted spelling, for input such as `12X`, `-1G` or `nan`.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}: give bytes or a number with K/M/G/T, e.g. 512M or 2G")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text}: sizes cannot be negative")
        return text
    raw = str(text).strip()
    if raw.strip().startswith("-"):
        raise ValueError(f"invalid size {raw!r}: sizes cannot be negative")
    match = _SIZE_RE.match(raw)
    if not match:
        raise ValueError(f"invalid size {raw!r}: give bytes or a number with K/M/G/T, e.g. 512M, 2G or 1.5GiB")
    value = float(match["num"]) * _UNITS[match["unit"].upper()]
    if not math.isfinite(value):
        raise ValueError(f"invalid size {raw!r}: too large")
    return int(value)


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
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{sign}{int(value)}{unit}" if unit == "B" else f"{sign}{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")

"""Sizes as people write and read them: `parse_size("2G")`, `format_size(1536)` (standard library only)."""

from __future__ import annotations

import re

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from '512M', '2G', '2GiB' or a plain number; ValueError with the accepted forms."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (use bytes or a number with K, M, G or T, e.g. 2G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    """`2 << 30` -> `2 GiB`, `1536` -> `1.5 KiB`, `1000` -> `1000 bytes`: exact where the size is a
    whole number of the unit (limits), one decimal otherwise (files)."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n // scale} {unit}" if n % scale == 0 else f"{n / scale:.1f} {unit}"
    return f"{n} bytes"

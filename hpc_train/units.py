"""Sizes in, bandwidths out: binary suffixes on input (fio style), decimal GB/s on output."""

from __future__ import annotations

import re

_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'4k' -> 4096, '1M' -> 1048576, '256MiB' -> 268435456, 8 -> 8 (base 1024, as fio)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional k/m/g/t/p suffix")
    return int(match.group(1)) * _SUFFIXES[match.group(2).lower()]


def format_size(nbytes: int) -> str:
    """Shortest exact binary form: 4096 -> '4K', 1048576 -> '1M', 1000 -> '1000'."""
    for suffix in ("P", "T", "G", "M", "K"):
        unit = _SUFFIXES[suffix.lower()]
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit}{suffix}"
    return str(nbytes)

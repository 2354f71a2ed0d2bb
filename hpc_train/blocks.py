"""The even split every layer uses: n elements (rows, samples, parameters) over `parts` ranks,
in contiguous blocks, the remainder on the first blocks. Ring collectives, ZeRO shards, the
parameter store, checkpoints and dataset writers all cut the same way, so a block written by
one is the block another reads."""

from __future__ import annotations


def block(n: int, parts: int, index: int) -> tuple[int, int]:
    """Elements [lo, hi) of block `index`."""
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def partition(n: int, parts: int) -> tuple[list[int], list[int]]:
    """Block sizes and offsets of every block."""
    spans = [block(n, parts, i) for i in range(parts)]
    return [hi - lo for lo, hi in spans], [lo for lo, _ in spans]

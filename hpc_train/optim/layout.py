"""Where every gradient lives in the flat vector and how that vector is cut into buckets.

Parameters are laid out in reverse registration order (the order backward finishes
them), so the first bucket is complete first. A `GradientLayout` is computed once from
the parameters and handed to a strategy: data parallel and ZeRO stage 1 bind every
gradient to a view of one fusion buffer in this layout, ZeRO stages 2 and 3 open a
buffer per bucket, and sharded strategies cut their slices from the same offsets.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


class Bucket:
    """Elements [start, stop) of the flat vector; complete when every element was announced."""

    def __init__(self, index: int, start: int, stop: int, names: list[str]):
        self.index, self.start, self.stop, self.names = index, start, stop, names
        self.ready = 0  # elements announced in the current backward pass
        self.passes = 0
        self.handle = None


@dataclass
class GradientLayout:
    """`offsets`: parameter name -> first element; `buckets` in index order; `total` elements."""

    offsets: dict
    buckets: list
    total: int

    def __post_init__(self):
        self._starts = [b.start for b in self.buckets]

    def first_bucket(self, element: int) -> int:
        """Index of the bucket that holds `element`."""
        return bisect.bisect_right(self._starts, element) - 1

    def spans_one_bucket(self) -> bool:
        """Whether every parameter lies in a single bucket (ZeRO 2/3 open one buffer a bucket for them)."""
        return sum(len(b.names) for b in self.buckets) == len(self.offsets)


def lay_out(named: dict, cap: int, split_parameters: bool) -> GradientLayout:
    """Offsets in reverse order; buckets of ~cap elements that end at parameter boundaries, except
    that with `split_parameters` a parameter larger than a bucket is cut into bucket-sized pieces
    (its layer announces its gradient in row blocks, so the pieces complete one by one)."""
    offsets, offset, cuts, start = {}, 0, [], 0
    for name, p in reversed(list(named.items())):
        offsets[name] = offset
        offset += p.size
        while offset - start >= cap:
            split = split_parameters and p.size > cap and offset - start > cap
            start = start + cap if split else offset
            cuts.append(start)
    if not cuts or cuts[-1] != offset:
        cuts.append(offset)
    buckets, lo = [], 0
    for hi in cuts:
        names = [n for n, off in offsets.items() if off < hi and off + named[n].size > lo]
        buckets.append(Bucket(len(buckets), lo, hi, names))
        lo = hi
    return GradientLayout(offsets, buckets, offset)

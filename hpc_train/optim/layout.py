"""Where every gradient lives in the flat vector and how that vector is cut into buckets.

Parameters are laid out in reverse registration order (the order backward finishes
them), so the first bucket is complete first. A `GradientLayout` is computed once from
the parameters and handed to a strategy: data parallel and ZeRO stage 1 bind every
gradient to a view of one fusion buffer in this layout, ZeRO stages 2 and 3 open a
buffer per bucket, and sharded strategies cut their slices from the same offsets.
A `BucketQueue` counts what backward announces and hands complete buckets out in
index order, whatever order a rank's layers finish in.
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


def concatenate(layouts: list[GradientLayout]) -> GradientLayout:
    """One layout over several flat vectors placed end to end (one per dtype): no bucket spans two."""
    offsets, buckets, base = {}, [], 0
    for layout in layouts:
        offsets.update({name: base + offset for name, offset in layout.offsets.items()})
        buckets += [Bucket(len(buckets) + i, base + b.start, base + b.stop, b.names)
                    for i, b in enumerate(layout.buckets)]
        base += layout.total
    return GradientLayout(offsets, buckets, base)


class BucketQueue:
    """Counts the elements backward announces in each bucket and hands out the buckets whose every
    element was announced `passes_per_step` times, in index order: a bucket that completes early
    waits for its predecessors, so every rank submits the same collectives in the same order."""

    def __init__(self, layout: GradientLayout, passes_per_step: int):
        self.layout, self.passes_per_step = layout, passes_per_step
        self.next = 0  # the first bucket not handed out yet

    def announce(self, lo: int, hi: int) -> list[Bucket]:
        """Elements [lo, hi) of the flat vector are final for this pass: the buckets now due."""
        buckets = self.layout.buckets
        index = self.layout.first_bucket(lo)
        while index < len(buckets) and buckets[index].start < hi:
            bucket = buckets[index]
            bucket.ready += min(hi, bucket.stop) - max(lo, bucket.start)
            if bucket.ready == bucket.stop - bucket.start:
                bucket.ready = 0
                bucket.passes += 1
            index += 1
        due = []
        while self.next < len(buckets) and buckets[self.next].passes >= self.passes_per_step:
            due.append(buckets[self.next])
            self.next += 1
        return due

    def remaining(self) -> list[Bucket]:
        """Every bucket not handed out yet (the step is here: complete or not, they go now)."""
        due = self.layout.buckets[self.next :]
        self.next = len(self.layout.buckets)
        return due

    def reset(self) -> None:
        """After the step's buckets were reduced: count afresh."""
        for bucket in self.layout.buckets:
            bucket.handle, bucket.passes, bucket.ready = None, 0, 0
        self.next = 0

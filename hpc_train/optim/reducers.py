"""Where a data-parallel strategy keeps gradients, and how it reduces a complete bucket.

The strategy (`DistributedOptimizer`, and the node-shared and ZeRO strategies built on it)
owns the layout, the bucket queue and the waits; a reducer owns the gradient memory and the
collective, behind one interface (`Reducer`):

- `FusedMean`: one fusion buffer in node-shared memory that every gradient is a view of; a
  bucket is averaged in place by allreduce, or travels as fp16/bf16 in a wire buffer
  (data parallel, ZeRO stage 1).
- `NodeMean`: the same buffer, a bucket reduce-scattered inside the node so that this rank's
  piece holds the mean over every rank (node-shared data parallel).
- `ShardedBuckets`: no full buffer: a bucket's gradients go to a buffer opened when backward
  reaches the first of its layers, reduce-scattered into this rank's slice, and released; at
  most `buckets_in_flight` submitted buffers alive (ZeRO stages 2 and 3).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .. import kernels
from ..comm import allreduce_async, reduce_scatter_async, reduce_scatter_node_async, shared_empty


def start_mean(grads, wire, size: int, name: str):
    """Start averaging `grads` over the ranks in place on the engine; the handle. With a `wire` buffer
    (fp16/bf16) the gradients travel in it, pre-divided by the rank count so that their sum stays in
    range: `finish_mean` unpacks it once the handle is done."""
    if wire is None:
        return allreduce_async(grads, op="mean", out=grads, name=name)
    kernels.pack(grads, wire, 1.0 / size)
    return allreduce_async(wire, op="sum", out=wire, name=name)


def finish_mean(wire, grads) -> None:
    """The averaged gradients out of a compressed bucket's wire buffer."""
    kernels.unpack(wire, grads)


def overlap(lo: int, hi: int, start: int, stop: int) -> tuple[int, int]:
    """[lo, hi) intersected with [start, stop), as an empty range at the clamp point if disjoint."""
    a = min(max(lo, start), stop)
    return a, max(a, min(hi, stop))


class Reducer(Protocol):
    """What a data-parallel strategy asks of its gradient reducer.

    - `collective`: the timeline's name for its collective; `whole_parameters`: its buckets must
      hold whole parameters (a layout without split parameters).
    - `bind(strategy)`: place every parameter's gradient (views of its memory, or None until a
      bucket opens), given the strategy's parameters (`_params`), offsets, buckets and comm.
    - `gradients(bucket)`: the bucket's gradients as one array, every parameter's in place.
    - `start(bucket, grads, name)`: start reducing them on the engine (a handle); `finish(bucket)`
      once the handle is done.
    - `nbytes()`: the gradient memory it holds (transient buffers are tallied by the strategy).

    `ShardedBuckets` also takes the model's layer events (`on_layer`), which ZeRO forwards to it.
    """

    collective: str
    whole_parameters: bool

    def bind(self, strategy) -> None: ...

    def gradients(self, bucket) -> np.ndarray: ...

    def start(self, bucket, grads: np.ndarray, name: str): ...

    def finish(self, bucket) -> None: ...

    def nbytes(self) -> int: ...


class FusedMean:
    """Every gradient a view of one fusion buffer (node-shared memory); buckets averaged in place."""

    collective = "allreduce"
    whole_parameters = False  # a parameter larger than a bucket is announced, and reduced, in row blocks

    def __init__(self, compressed=None):
        self.compressed = compressed  # the wire dtype (fp16/bf16), or None

    def bind(self, strategy) -> None:
        comm, params, offsets = strategy._engine.comm, strategy._params, strategy._offsets
        dtype = next(iter(params.values())).data.dtype
        total = strategy.layout.total
        self.size = comm.Get_size()
        self.flat = shared_empty(total, dtype, comm=comm)
        self.flat[...] = 0
        self.wire = shared_empty(total, self.compressed, comm=comm) if self.compressed else None
        for name, p in params.items():
            view = self.flat[offsets[name] : offsets[name] + p.size].reshape(p.data.shape)
            view[...] = p.grad
            p.grad = view

    def gradients(self, bucket) -> np.ndarray:
        return self.flat[bucket.start : bucket.stop]

    def start(self, bucket, grads: np.ndarray, name: str):
        wire = None if self.wire is None else self.wire[bucket.start : bucket.stop]
        return start_mean(grads, wire, self.size, name)

    def finish(self, bucket) -> None:
        if self.wire is not None:
            finish_mean(self.wire[bucket.start : bucket.stop], self.flat[bucket.start : bucket.stop])

    def nbytes(self) -> int:
        return self.flat.nbytes + (self.wire.nbytes if self.wire is not None else 0)


class NodeMean(FusedMean):
    """The fusion buffer, each bucket reduce-scattered inside the node: this rank's piece gets the mean."""

    collective = "reduce-scatter"

    def __init__(self):
        super().__init__(compressed=None)

    def start(self, bucket, grads: np.ndarray, name: str):
        return reduce_scatter_node_async(grads, "mean", name=name)


class ShardedBuckets:
    """ZeRO 2/3: a buffer per bucket, opened as backward reaches it, reduce-scattered into this
    rank's slice (`into`, the elements [shard.start, shard.stop) of the flat vector) and released.

    `tally(kind, nbytes)` counts transient memory; `wait(handle)` waits for a collective (the
    strategy's watched wait); the strategy calls `on_layer` from the model's layer hook. Needs a
    Sequential model (its layer hooks) and no compression.
    """

    collective = "reduce-scatter"
    whole_parameters = True  # a bucket holds whole parameters: its buffer backs their gradients' views

    def __init__(self, model, into: np.ndarray, shard: slice, shards: list, buckets_in_flight: int, tally, wait,
                 stage: int):
        if not hasattr(model, "register_layer_hook"):
            raise TypeError(f"ZeRO stage {stage} needs a Sequential model, got {type(model).__name__}")
        self.model, self.into, self.shard, self.shards, self.stage = model, into, shard, shards, stage
        self.buckets_in_flight = max(1, buckets_in_flight)
        self.tally, self.wait = tally, wait
        self.buffers: dict[int, np.ndarray] = {}  # open gradient buffers by bucket index

    def bind(self, strategy) -> None:
        if not strategy.layout.spans_one_bucket():
            raise ValueError(f"ZeRO stage {self.stage} opens one buffer a bucket: every parameter must lie in one "
                             "bucket (a layout with split_parameters=False)")
        self.params, self.offsets, self.buckets = strategy._params, strategy._offsets, strategy.buckets
        for p in self.params.values():
            p.grad = None  # bound to a bucket buffer while its layer runs backward
        self.bucket_of = {name: b for b in self.buckets for name in b.names}
        self.layers = layer_spans(self.model, self.params, self.offsets)

    def on_layer(self, event: str, index: int) -> None:
        """Before a layer's backward: open the buffers of the buckets its parameters lie in."""
        if event == "backward" and index in self.layers:
            for name in self.layers[index][2]:
                bucket = self.bucket_of[name]
                if bucket.index not in self.buffers:
                    self._open(bucket)

    def _open(self, bucket) -> np.ndarray:
        """A fresh buffer for a bucket's gradients; its parameters' grads become stale views of it."""
        submitted = [i for i in self.buffers if self.buckets[i].handle is not None]
        while len(submitted) >= self.buckets_in_flight:
            oldest = self.buckets[submitted.pop(0)]
            self.wait(oldest.handle)
            self.finish(oldest)
        buffer = np.empty(bucket.stop - bucket.start, self.into.dtype)
        for name in bucket.names:
            p = self.params[name]
            start = self.offsets[name] - bucket.start
            p.grad = buffer[start : start + p.size].reshape(p.data.shape)
            p.stale = True
        self.buffers[bucket.index] = buffer
        self.tally("grads", buffer.nbytes)
        return buffer

    def gradients(self, bucket) -> np.ndarray:
        buffer = self.buffers.get(bucket.index)
        return self._open(bucket) if buffer is None else buffer  # None: no backward reached these parameters

    def start(self, bucket, grads: np.ndarray, name: str):
        counts = [b - a for a, b in (overlap(bucket.start, bucket.stop, o, o + c) for o, c in self.shards)]
        a, b = overlap(bucket.start, bucket.stop, self.shard.start, self.shard.stop)
        out = self.into[a - self.shard.start : b - self.shard.start]
        return reduce_scatter_async(grads, "mean", out=out, counts=counts, name=name)

    def finish(self, bucket) -> None:
        buffer = self.buffers.pop(bucket.index, None)
        if buffer is not None:
            for name in bucket.names:
                self.params[name].grad = None
            self.tally("grads", -buffer.nbytes)

    def nbytes(self) -> int:
        return self.into.nbytes


def layer_spans(model, params: dict, offsets: dict) -> dict[int, tuple[int, int, list[str]]]:
    """index -> (lo, hi, names): the contiguous range of the flat vector a layer's parameters fill."""
    spans = {}
    for i, layer in enumerate(model.layers):
        names = [f"{i}.{n}" for n in layer.named_parameters()]
        if names:
            lo = min(offsets[n] for n in names)
            spans[i] = (lo, lo + sum(params[n].size for n in names), names)
    return spans

"""Data-parallel training: gradients averaged over ranks while backward still runs.

Every parameter's gradient is re-pointed into one flat fusion buffer allocated in
node-shared memory, laid out in reverse layer order (the order backward finishes
them) and cut into buckets of about `bucket_mb`. As soon as backward has finished
every gradient of a bucket, the bucket is averaged in place on the background
engine: no packing copy, and no copy into the shared window either. `step()`
waits for the outstanding buckets and updates the parameters.

Buckets are always submitted in index order (`layout.BucketQueue`), so every rank
runs the same collectives in the same order even if ranks finish layers in a
different order or skip a parameter; whatever was not submitted during backward is
submitted by `step()`.
"""

from __future__ import annotations

import time

import numpy as np

from ..comm import broadcast, engine
from ..comm.ops import bfloat16_dtype
from .layout import Bucket, BucketQueue, GradientLayout, lay_out
from .reducers import FusedMean, Reducer
from .strategy import ReplicatedState

COMPRESSIONS = ("fp16", "bf16")


def broadcast_parameters(params, root: int = 0) -> None:
    """Copy root's parameter values to every rank (by name, in sorted order)."""
    named = params.named_parameters() if hasattr(params, "named_parameters") else dict(params)
    for name in sorted(named):
        broadcast(named[name].data, root=root, name=name)


def broadcast_optimizer_state(optimizer, root: int = 0) -> None:
    """Copy root's optimizer state arrays and step count to every rank. A root whose state was never
    created (all zeros) sends none, and no rank creates its own: a sharding strategy may still retarget it."""
    created = np.array([optimizer.has_state], np.int8)
    broadcast(created, root=root, name="optimizer.has_state")
    if created[0]:
        arrays = optimizer.state_arrays()
        for name in sorted(arrays):
            broadcast(arrays[name], root=root, name=name)
    steps = np.array([optimizer.steps], np.int64)
    broadcast(steps, root=root, name="optimizer.steps")
    optimizer.steps = int(steps[0])


def compressed_dtype(compression):
    if compression is None:
        return None
    if compression == "fp16":
        return np.dtype(np.float16)
    if compression == "bf16":
        bf16 = bfloat16_dtype()
        if bf16 is None:
            raise ValueError("compression 'bf16' needs ml_dtypes (pip install ml_dtypes)")
        return bf16
    raise ValueError(f"compression {compression!r}: expected None or one of {COMPRESSIONS}")


class DistributedOptimizer(ReplicatedState):
    """Wrap an optimizer so that `step()` applies gradients averaged over all ranks.

    `backward_passes_per_step=k` accumulates k backward passes locally and reduces
    once; the applied gradient is the mean over the k passes and all ranks, i.e.
    the gradient of the global batch. `compression` sends buckets as fp16 or bf16
    (pre-divided by the rank count so that their sum stays in range). A wait longer
    than `stall_warning_s` logs the ranks that have not joined; after `stall_abort_s`
    the job aborts. `timeline` (train.timeline.Timeline) records pack, allreduce and
    unpack per bucket; `exposed_s` is the last step's wait for communication. `layout`
    (`layout.GradientLayout`) places gradients and cuts buckets; by default `lay_out` with
    buckets of `bucket_mb`. `reducer` (reducers.py) holds the gradients and reduces a complete
    bucket: by default `FusedMean`, the fusion buffer allreduced in place.

    It is the data-parallel training strategy (`strategy.Strategy`).
    """

    def __init__(self, optimizer, model, bucket_mb: float = 25.0, compression: str | None = None,
                 backward_passes_per_step: int = 1, stall_warning_s: float = 60.0,
                 stall_abort_s: float = 600.0, timeline=None, layout: GradientLayout | None = None,
                 reducer: Reducer | None = None):
        if backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        self.optimizer, self.model = optimizer, model
        self.passes_per_step = backward_passes_per_step
        self.compressed = compressed_dtype(compression)
        self.reducer = reducer if reducer is not None else FusedMean(self.compressed)
        named = model.named_parameters()
        self._params = named
        dtypes = {str(p.data.dtype) for p in named.values()}
        if len(dtypes) != 1:
            raise TypeError(f"DistributedOptimizer needs one parameter dtype, got {sorted(dtypes)}")
        dtype = named[next(iter(named))].data.dtype
        self._engine = engine()
        comm = self._engine.comm
        self.size = comm.Get_size()
        self.stall_warning_s, self.stall_abort_s = stall_warning_s, stall_abort_s
        self.timeline = timeline
        self.exposed_s = 0.0
        total = sum(p.size for p in named.values())
        self.layout = layout or lay_out(named, max(1, int(bucket_mb * (1 << 20)) // dtype.itemsize),
                                        not self.reducer.whole_parameters)
        if set(self.layout.offsets) != set(named) or self.layout.total != total:
            raise ValueError(f"gradient layout of {len(self.layout.offsets)} parameters ({self.layout.total} elements) "
                             f"does not match the model's {len(named)} ({total} elements)")
        self._offsets, self.buckets = self.layout.offsets, self.layout.buckets
        self.reducer.bind(self)
        self.queue = BucketQueue(self.layout, self.passes_per_step)
        broadcast_parameters(named)
        broadcast_optimizer_state(optimizer)
        model.register_grad_hook(self._grad_ready)

    def _grad_ready(self, name: str, parameter, start: int, stop: int) -> None:
        offset = self._offsets.get(name)
        if offset is not None:
            for bucket in self.queue.announce(offset + start, offset + stop):
                self._submit(bucket)

    def _submit(self, bucket: Bucket) -> None:
        start = time.perf_counter()
        grads = self.reducer.gradients(bucket)
        for name in bucket.names:  # parameters no backward reached hold stale values
            self._params[name].materialize()
        if self.passes_per_step > 1:
            grads /= self.passes_per_step
        bucket.handle = self.reducer.start(bucket, grads, f"bucket{bucket.index}")
        self._record(f"pack bucket{bucket.index}", "comm", start, time.perf_counter())

    def synchronize(self) -> None:
        """Submit what backward did not, wait for every bucket, and unpack compressed ones."""
        for bucket in self.queue.remaining():
            self._submit(bucket)
        waiting = time.perf_counter()
        for bucket in self.buckets:
            handle = bucket.handle
            self._engine.wait_watched(handle, self.stall_warning_s, self.stall_abort_s)
            self._record(f"{self.reducer.collective} {handle.name}", "comm", handle.started, handle.finished,
                         tid="engine")
            start = time.perf_counter()
            self.reducer.finish(bucket)
            if self.compressed is not None:
                self._record(f"unpack {handle.name}", "comm", start, time.perf_counter())
        self.queue.reset()
        self.exposed_s = time.perf_counter() - waiting
        self._record("wait for gradients", "comm", waiting, waiting + self.exposed_s)

    def _record(self, name, cat, start, end, tid="main") -> None:
        if self.timeline is not None:
            self.timeline.add(name, cat, start, end, tid)

    def step(self) -> None:
        self.synchronize()
        self.optimizer.step()

    def held_bytes(self) -> dict:
        """Bytes this rank holds for parameters, gradients (fusion and wire buffers) and optimizer state."""
        params = sum(p.data.nbytes for p in self._params.values())
        grads = self.reducer.nbytes()
        state = sum(a.nbytes for a in self.optimizer.state_arrays().values())
        return {"params": params, "grads": grads, "state": state, "total": params + grads + state, "transient": 0}

    def zero_grad(self) -> None:
        for p in self._params.values():
            p.zero_grad()

    @property
    def lr(self) -> float:
        return self.optimizer.lr

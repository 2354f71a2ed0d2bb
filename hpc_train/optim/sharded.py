"""ZeRO stages 1-3 (Rajbhandari et al., SC'20): optimizer state, gradients and parameters sharded.

Every parameter has an offset in one global flat vector, in reverse layer order
(the data-parallel fusion buffer's layout); rank r owns the contiguous slice
`partition(n, p)[r]` of it at every stage, and keeps optimizer state for that
slice only.

- stage 1: gradients are averaged as in DistributedOptimizer (buckets of the full
  fusion buffer allreduced while backward runs); rank r updates its slice and an
  allgather returns every rank's updated slice to all.
- stage 2: there is no full gradient buffer. A bucket's gradients are written into
  a buffer opened just before the first of its layers runs backward; as soon as
  the bucket is complete it is reduce-scattered (mean) on the engine, each rank
  receiving the bucket's intersection with its slice, and the buffer is released
  once reduced. At most `buckets_in_flight` submitted buffers are alive: opening
  another first waits for the oldest.
- stage 3: parameters too. Rank r keeps only its slice; a layer's parameters are
  allgathered just before its forward and again before its backward (the next
  layer's gather is prefetched on the engine while this one computes) and released
  after it. A released parameter is a zero-stride placeholder of the right shape.
  `step()` updates the slice; nothing is gathered until the next forward.
"""

from __future__ import annotations

import time

import numpy as np

from ..checkpoint import Slab
from ..comm import allgather, allgather_async, partition, reduce_scatter_async
from ..nn.module import Parameter
from .distributed import DistributedOptimizer

STAGES = (1, 2, 3)


def _overlap(lo: int, hi: int, start: int, stop: int) -> tuple[int, int]:
    """[lo, hi) intersected with [start, stop), as an empty range at the clamp point if disjoint."""
    a = min(max(lo, start), stop)
    return a, max(a, min(hi, stop))


def released(p) -> np.ndarray:
    """A placeholder with the parameter's shape and dtype that holds no memory (read-only zeros)."""
    return np.broadcast_to(np.zeros((), p.data.dtype), p.data.shape)


class ShardedOptimizer(DistributedOptimizer):
    """ZeRO wrapper: same constructor arguments as DistributedOptimizer plus `stage`.

    Stages 2 and 3 need a Sequential model (its layer hooks open gradient buffers
    and gather parameters) and do not support gradient compression.
    """

    def __init__(self, optimizer, model, stage: int = 1, buckets_in_flight: int = 2, **kwargs):
        if stage not in STAGES:
            raise ValueError(f"ZeRO stage {stage} is not implemented; available: {STAGES}")
        if stage >= 2 and kwargs.get("compression"):
            raise ValueError(f"ZeRO stage {stage} reduce-scatters float32 gradients: compression "
                             f"{kwargs['compression']!r} is only available with stage 0 or 1")
        if stage >= 2 and not hasattr(model, "register_layer_hook"):
            raise TypeError(f"ZeRO stage {stage} needs a Sequential model, got {type(model).__name__}")
        self.stage = stage
        self.buckets_in_flight = max(1, buckets_in_flight)
        self._buffers: dict[int, np.ndarray] = {}  # open gradient buffers by bucket index (stages 2-3)
        self._live = {"grads": 0, "params": 0}
        self.peak = {"grads": 0, "params": 0}  # high-water marks of transient buffers, bytes
        super().__init__(optimizer, model, **kwargs)  # broadcasts parameters and the full state first
        named = self._params
        dtype = next(iter(named.values())).data.dtype
        total = sum(p.size for p in named.values())
        counts, offsets = partition(total, self.size)
        rank = self._engine.comm.Get_rank()
        self.shard = slice(offsets[rank], offsets[rank] + counts[rank])
        self._shards = list(zip(offsets, counts, strict=True))  # (start, count) of every rank's slice
        self._bucket_of = {name: b for b in self.buckets for name in b.names}
        self._layers = self._layer_spans(model) if stage >= 2 else {}
        self._prefetched: dict[int, tuple] = {}  # layer index -> (handle, buffer) of a gather under way
        order = sorted(self._layers)
        self._following = {"forward": dict(zip(order, order[1:], strict=False)),
                           "backward": dict(zip(order[1:], order, strict=False))}
        self._gather_wait_s = 0.0
        if stage <= 2:
            self.params_flat = np.empty(total, dtype)
            for name, p in named.items():
                view = self.params_flat[self._offsets[name] : self._offsets[name] + p.size].reshape(p.data.shape)
                view[...] = p.data
                p.data = view
            owned = Parameter(self.params_flat[self.shard])
        else:
            self.params_flat = None
            owned = Parameter(np.zeros(counts[rank], dtype))
            for name, p in named.items():
                a, b = _overlap(self._offsets[name], self._offsets[name] + p.size, self.shard.start, self.shard.stop)
                owned.data[a - self.shard.start : b - self.shard.start] = \
                    p.data.reshape(-1)[a - self._offsets[name] : b - self._offsets[name]]
                p.data = released(p)
        owned.grad = self.flat[self.shard] if stage == 1 else np.zeros(counts[rank], dtype)
        self.owned = owned
        optimizer.retarget({"shard": owned}, {"shard": {kind: owned.data * 0 for kind in optimizer.state_kinds}})
        if stage >= 2:
            model.register_layer_hook(self._layer_event)

    # -- layout ----------------------------------------------------------------------------------

    @property
    def split_parameters(self) -> bool:
        return self.stage == 1  # a stage-2 bucket holds whole parameters: its buffer backs their views

    def _allocate_gradients(self, total: int, dtype, comm) -> None:
        if self.stage == 1:
            super()._allocate_gradients(total, dtype, comm)
        else:
            self.flat = self._wire = None

    def _bind_gradient(self, name: str, p, offset: int) -> None:
        if self.stage == 1:
            super()._bind_gradient(name, p, offset)
        else:
            p.grad = None  # bound to a bucket buffer while its layer runs backward

    def _layer_spans(self, model) -> dict[int, tuple[int, int, list[str]]]:
        """index -> (lo, hi, names): the contiguous range of the flat vector a layer's parameters fill."""
        spans = {}
        for i, layer in enumerate(model.layers):
            names = [f"{i}.{n}" for n in layer.named_parameters()]
            if names:
                lo = min(self._offsets[n] for n in names)
                spans[i] = (lo, lo + sum(self._params[n].size for n in names), names)
        return spans

    # -- stage 2: gradient buckets ---------------------------------------------------------------

    def _track(self, kind: str, nbytes: int) -> None:
        self._live[kind] += nbytes
        self.peak[kind] = max(self.peak[kind], self._live[kind])

    def _open(self, bucket) -> np.ndarray:
        """A fresh buffer for a bucket's gradients; its parameters' grads become stale views of it."""
        submitted = [i for i in self._buffers if self.buckets[i].handle is not None]
        while len(submitted) >= self.buckets_in_flight:
            oldest = self.buckets[submitted.pop(0)]
            self._engine.wait_watched(oldest.handle, self.stall_warning_s, self.stall_abort_s)
            self._release(oldest)
        buffer = np.empty(bucket.stop - bucket.start, self.owned.data.dtype)
        for name in bucket.names:
            p = self._params[name]
            start = self._offsets[name] - bucket.start
            p.grad = buffer[start : start + p.size].reshape(p.data.shape)
            p.stale = True
        self._buffers[bucket.index] = buffer
        self._track("grads", buffer.nbytes)
        return buffer

    def _release(self, bucket) -> None:
        buffer = self._buffers.pop(bucket.index, None)
        if buffer is not None:
            for name in bucket.names:
                self._params[name].grad = None
            self._track("grads", -buffer.nbytes)

    def _submit(self, bucket) -> None:
        if self.stage == 1:
            super()._submit(bucket)
            return
        start = time.perf_counter()
        buffer = self._buffers.get(bucket.index)
        if buffer is None:  # no backward reached these parameters
            buffer = self._open(bucket)
        for name in bucket.names:
            self._params[name].materialize()
        if self.passes_per_step > 1:
            buffer /= self.passes_per_step
        counts = [b - a for a, b in (_overlap(bucket.start, bucket.stop, o, o + c) for o, c in self._shards)]
        a, b = _overlap(bucket.start, bucket.stop, self.shard.start, self.shard.stop)
        out = self.owned.grad[a - self.shard.start : b - self.shard.start]
        bucket.handle = reduce_scatter_async(buffer, "mean", out=out, counts=counts, name=f"bucket{bucket.index}")
        self._record(f"submit bucket{bucket.index}", "comm", start, time.perf_counter())

    reduction = property(lambda self: "allreduce" if self.stage == 1 else "reduce-scatter")

    def _reduced(self, bucket) -> None:
        if self.stage == 1:
            super()._reduced(bucket)
        else:
            self._release(bucket)

    # -- stage 3: parameters gathered around each layer ------------------------------------------

    def _layer_event(self, event: str, index: int, layer) -> None:
        if index not in self._layers:
            return
        if event in ("forward", "backward") and self.stage == 3:
            self._gather(index)
            upcoming = self._following[event].get(index)
            if upcoming is not None and upcoming not in self._prefetched:
                self._prefetched[upcoming] = self._start_gather(upcoming)
        if event == "backward":
            for name in self._layers[index][2]:
                bucket = self._bucket_of[name]
                if bucket.index not in self._buffers:
                    self._open(bucket)
        if event in ("forward_done", "backward_done") and self.stage == 3:
            lo, hi, names = self._layers[index]
            for name in names:
                self._params[name].data = released(self._params[name])
            self._track("params", -(hi - lo) * self.owned.data.itemsize)

    def _start_gather(self, index: int) -> tuple:
        lo, hi, _ = self._layers[index]
        a, b = _overlap(lo, hi, self.shard.start, self.shard.stop)
        out = np.empty(hi - lo, self.owned.data.dtype)
        self._track("params", out.nbytes)
        piece = self.owned.data[a - self.shard.start : b - self.shard.start]
        return allgather_async(piece, out=out, name=f"gather layer{index}"), out

    def _gather(self, index: int) -> None:
        handle, out = self._prefetched.pop(index, None) or self._start_gather(index)
        waiting = time.perf_counter()
        self._engine.wait_watched(handle, self.stall_warning_s, self.stall_abort_s)
        done = time.perf_counter()
        self._gather_wait_s += done - waiting
        self._record(f"allgather {handle.name}", "comm", handle.started, handle.finished, tid="engine")
        self._record(f"wait for {handle.name}", "comm", waiting, done)
        lo, _, names = self._layers[index]
        for name in names:
            p = self._params[name]
            start = self._offsets[name] - lo
            p.data = out[start : start + p.size].reshape(p.data.shape)

    # -- the step --------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        super().zero_grad()
        self._gather_wait_s = 0.0

    def synchronize(self) -> None:
        super().synchronize()
        self.exposed_s += self._gather_wait_s

    def step(self) -> None:
        self.synchronize()
        self.optimizer.step()  # this rank's slice only
        if self.stage <= 2:
            mine = self.params_flat[self.shard].copy()  # MPI forbids a send buffer inside the receive buffer
            allgather(mine, out=self.params_flat, name="zero-parameters")

    # -- what this rank holds --------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds."""
        return sum(a.nbytes for a in self.optimizer.state_arrays().values())

    def held_bytes(self) -> dict:
        params = self.params_flat.nbytes if self.stage <= 2 else self.owned.data.nbytes + self.peak["params"]
        grads = self.flat.nbytes if self.stage == 1 else self.owned.grad.nbytes + self.peak["grads"]
        state = self.state_bytes()
        return {"params": params, "grads": grads, "state": state, "total": params + grads + state,
                "transient": self.peak["grads"] + self.peak["params"]}

    def shard_arrays(self) -> dict:
        """This rank's slices of the flat parameter and optimizer-state vectors (for checkpoints)."""
        arrays = {"params": self.owned.data}
        arrays.update({f"state/{kind}": a for kind, a in self.optimizer.state["shard"].items()})
        return arrays

    def shards_loaded(self) -> None:
        """After shard_arrays() were overwritten (a resume): give stage 1-2 ranks the full parameters."""
        if self.stage <= 2:
            self.params_flat[...] = allgather(self.owned.data.copy(), name="zero-parameters")

    def full_parameters(self) -> dict:
        """Every parameter, whole, by name (collective): for evaluation elsewhere or export."""
        flat = allgather(self.owned.data.copy(), name="zero-full-parameters")
        return {name: flat[offset : offset + self._params[name].size].reshape(self._params[name].data.shape)
                for name, offset in self._offsets.items()}

    def layout(self) -> list:
        """[name, shape] in flat order: what a sharded checkpoint must match."""
        return [[name, list(self._params[name].data.shape)] for name in sorted(self._offsets, key=self._offsets.get)]

    # -- the Strategy's checkpoints: this rank's slices of the flat vectors --------------------------

    def checkpoint_arrays(self) -> dict:
        total = sum(p.size for p in self._params.values())
        return {f"zero/{name}": Slab(a, self.shard.start, total) for name, a in self.shard_arrays().items()}

    checkpoint_layout = layout

    def load_checkpoint(self, arrays: dict, steps: int) -> None:
        for name, slab in self.checkpoint_arrays().items():
            slab.data[...] = arrays[name]
        self.shards_loaded()
        self.optimizer.steps = steps

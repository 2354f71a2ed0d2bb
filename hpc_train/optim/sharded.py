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

One class a stage, each adding to the one before what its stage shards: `ZeroStage1`
(the data-parallel buckets, a sharded update), `ZeroStage2` (gradient buckets
reduce-scattered and released), `ZeroStage3` (parameters gathered around each
layer). `ShardedOptimizer(..., stage=s)` picks one.
"""

from __future__ import annotations

import time

import numpy as np

from ..checkpoint import Slab
from ..comm import allgather, allgather_async, partition, reduce_scatter_async
from ..nn.module import Parameter
from .distributed import DistributedOptimizer


def _overlap(lo: int, hi: int, start: int, stop: int) -> tuple[int, int]:
    """[lo, hi) intersected with [start, stop), as an empty range at the clamp point if disjoint."""
    a = min(max(lo, start), stop)
    return a, max(a, min(hi, stop))


def released(p) -> np.ndarray:
    """A placeholder with the parameter's shape and dtype that holds no memory (read-only zeros)."""
    return np.broadcast_to(np.zeros((), p.data.dtype), p.data.shape)


class _Zero(DistributedOptimizer):
    """What every stage shares: rank r's slice of the flat vector, the optimizer retargeted at it
    (so the whole optimizer state is never created), checkpoints as slices. Stages 1 and 2 keep
    every parameter whole (`params_flat`) and allgather the updated slices after the step."""

    stage = 0

    def __init__(self, optimizer, model, **kwargs):
        self._live = {"grads": 0, "params": 0}
        self.peak = {"grads": 0, "params": 0}  # high-water marks of transient buffers, bytes
        super().__init__(optimizer, model, **kwargs)  # broadcasts parameters (the state only if created)
        named = self._params
        dtype = next(iter(named.values())).data.dtype
        total = sum(p.size for p in named.values())
        counts, offsets = partition(total, self.size)
        rank = self._engine.comm.Get_rank()
        self.shard = slice(offsets[rank], offsets[rank] + counts[rank])
        self._shards = list(zip(offsets, counts, strict=True))  # (start, count) of every rank's slice
        self.owned = self._own_parameters(named, total, dtype)
        self.owned.grad = self._owned_gradient()
        optimizer.retarget({"shard": self.owned},
                           {"shard": {kind: self.owned.data * 0 for kind in optimizer.state_kinds}})

    def _own_parameters(self, named: dict, total: int, dtype) -> Parameter:
        """Every parameter becomes a view of one flat vector; this rank owns its slice of it."""
        self.params_flat = np.empty(total, dtype)
        for name, p in named.items():
            view = self.params_flat[self._offsets[name] : self._offsets[name] + p.size].reshape(p.data.shape)
            view[...] = p.data
            p.data = view
        return Parameter(self.params_flat[self.shard])

    def _owned_gradient(self) -> np.ndarray:
        raise NotImplementedError

    def _track(self, kind: str, nbytes: int) -> None:
        self._live[kind] += nbytes
        self.peak[kind] = max(self.peak[kind], self._live[kind])

    def step(self) -> None:
        self.synchronize()
        self.optimizer.step()  # this rank's slice only
        mine = self.params_flat[self.shard].copy()  # MPI forbids a send buffer inside the receive buffer
        allgather(mine, out=self.params_flat, name="zero-parameters")

    # -- what this rank holds --------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds."""
        return sum(a.nbytes for a in self.optimizer.state_arrays().values())

    def _parameter_bytes(self) -> int:
        return self.params_flat.nbytes

    def _gradient_bytes(self) -> int:
        return self.owned.grad.nbytes + self.peak["grads"]

    def held_bytes(self) -> dict:
        params, grads, state = self._parameter_bytes(), self._gradient_bytes(), self.state_bytes()
        return {"params": params, "grads": grads, "state": state, "total": params + grads + state,
                "transient": self.peak["grads"] + self.peak["params"]}

    def shard_arrays(self) -> dict:
        """This rank's slices of the flat parameter and optimizer-state vectors (for checkpoints)."""
        arrays = {"params": self.owned.data}
        arrays.update({f"state/{kind}": a for kind, a in self.optimizer.state["shard"].items()})
        return arrays

    def shards_loaded(self) -> None:
        """After shard_arrays() were overwritten (a resume): every rank gets the full parameters."""
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


class ZeroStage1(_Zero):
    """Optimizer state sharded: gradients averaged whole, as in data parallel; the update is this
    rank's slice of the fusion buffer."""

    stage = 1

    def _owned_gradient(self) -> np.ndarray:
        return self.flat[self.shard]

    def _gradient_bytes(self) -> int:
        return self.flat.nbytes


class ZeroStage2(_Zero):
    """Gradients sharded too: bucket buffers opened as backward reaches them, reduce-scattered into
    this rank's slice and released. Needs a Sequential model (its layer hooks); no compression."""

    stage = 2
    split_parameters = False  # a bucket holds whole parameters: its buffer backs their gradients' views
    reduction = "reduce-scatter"

    def __init__(self, optimizer, model, buckets_in_flight: int = 2, **kwargs):
        if kwargs.get("compression"):
            raise ValueError(f"ZeRO stage {self.stage} reduce-scatters float32 gradients: compression "
                             f"{kwargs['compression']!r} is only available with stage 0 or 1")
        if not hasattr(model, "register_layer_hook"):
            raise TypeError(f"ZeRO stage {self.stage} needs a Sequential model, got {type(model).__name__}")
        self.buckets_in_flight = max(1, buckets_in_flight)
        if kwargs.get("layout") is not None and not kwargs["layout"].spans_one_bucket():
            raise ValueError(f"ZeRO stage {self.stage} opens one buffer a bucket: every parameter must lie in "
                             f"one bucket (a layout with split_parameters=False)")
        self._buffers: dict[int, np.ndarray] = {}  # open gradient buffers by bucket index
        super().__init__(optimizer, model, **kwargs)
        self._bucket_of = {name: b for b in self.buckets for name in b.names}
        self._layers = self._layer_spans(model)
        model.register_layer_hook(self._layer_event)

    def _allocate_gradients(self, total: int, dtype, comm) -> None:
        self.flat = self._wire = None  # no full gradient buffer

    def _bind_gradient(self, name: str, p, offset: int) -> None:
        p.grad = None  # bound to a bucket buffer while its layer runs backward

    def _owned_gradient(self) -> np.ndarray:
        return np.zeros_like(self.owned.data)

    def _layer_spans(self, model) -> dict[int, tuple[int, int, list[str]]]:
        """index -> (lo, hi, names): the contiguous range of the flat vector a layer's parameters fill."""
        spans = {}
        for i, layer in enumerate(model.layers):
            names = [f"{i}.{n}" for n in layer.named_parameters()]
            if names:
                lo = min(self._offsets[n] for n in names)
                spans[i] = (lo, lo + sum(self._params[n].size for n in names), names)
        return spans

    def _layer_event(self, event: str, index: int, layer) -> None:
        if event == "backward" and index in self._layers:
            for name in self._layers[index][2]:
                bucket = self._bucket_of[name]
                if bucket.index not in self._buffers:
                    self._open(bucket)

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

    def _reduced(self, bucket) -> None:
        self._release(bucket)


class ZeroStage3(ZeroStage2):
    """Parameters sharded too: a layer's are allgathered before its forward and its backward (the
    next layer's gather prefetched on the engine) and released after; the step updates the slice."""

    stage = 3

    def __init__(self, optimizer, model, **kwargs):
        self._prefetched: dict[int, tuple] = {}  # layer index -> (handle, buffer) of a gather under way
        self._gather_wait_s = 0.0
        super().__init__(optimizer, model, **kwargs)
        order = sorted(self._layers)
        self._following = {"forward": dict(zip(order, order[1:], strict=False)),
                           "backward": dict(zip(order[1:], order, strict=False))}

    def _own_parameters(self, named: dict, total: int, dtype) -> Parameter:
        """This rank keeps its slice only; every parameter is released until its layer runs."""
        self.params_flat = None
        owned = Parameter(np.zeros(self.shard.stop - self.shard.start, dtype))
        for name, p in named.items():
            a, b = _overlap(self._offsets[name], self._offsets[name] + p.size, self.shard.start, self.shard.stop)
            owned.data[a - self.shard.start : b - self.shard.start] = \
                p.data.reshape(-1)[a - self._offsets[name] : b - self._offsets[name]]
            p.data = released(p)
        return owned

    def _layer_event(self, event: str, index: int, layer) -> None:
        if index not in self._layers:
            return
        if event in ("forward", "backward"):
            self._gather(index)
            upcoming = self._following[event].get(index)
            if upcoming is not None and upcoming not in self._prefetched:
                self._prefetched[upcoming] = self._start_gather(upcoming)
        super()._layer_event(event, index, layer)
        if event in ("forward_done", "backward_done"):
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

    def zero_grad(self) -> None:
        super().zero_grad()
        self._gather_wait_s = 0.0

    def synchronize(self) -> None:
        super().synchronize()
        self.exposed_s += self._gather_wait_s

    def step(self) -> None:
        self.synchronize()
        self.optimizer.step()  # this rank's slice; nothing is gathered until the next forward

    def shards_loaded(self) -> None:
        """Nothing to rebuild: parameters are gathered from the slices when their layer runs."""

    def _parameter_bytes(self) -> int:
        return self.owned.data.nbytes + self.peak["params"]


ZERO_STAGES = {1: ZeroStage1, 2: ZeroStage2, 3: ZeroStage3}
STAGES = tuple(ZERO_STAGES)


def ShardedOptimizer(optimizer, model, stage: int = 1, **kwargs):  # noqa: N802 (reads as the class it returns)
    """ZeRO stage `stage` around `optimizer` and `model`: the ZERO_STAGES class, same arguments as
    DistributedOptimizer (stages 2 and 3 also take `buckets_in_flight`)."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage {stage} is not implemented; available: {STAGES}")
    return ZERO_STAGES[stage](optimizer, model, **kwargs)

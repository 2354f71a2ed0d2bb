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

A stage is two components (`ZERO_STAGES`): where gradients go (the fusion buffer's
`FusedMean`, or `ShardedBuckets` reduce-scattered into the slice: reducers.py) and
where parameters live (`WholeParameters` on every rank, or `GatheredParameters`
around each layer); `ShardedOptimizer` is the strategy that composes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..checkpoint import Slab
from ..comm import allgather, allgather_async, engine, partition
from ..nn.module import Parameter
from .distributed import DistributedOptimizer
from .reducers import ShardedBuckets, layer_spans, overlap


def released(p) -> np.ndarray:
    """A placeholder with the parameter's shape and dtype that holds no memory (read-only zeros)."""
    return np.broadcast_to(np.zeros((), p.data.dtype), p.data.shape)


class WholeParameters:
    """Stages 1 and 2: every rank keeps every parameter whole, as views of one flat vector; after
    this rank's slice is updated, an allgather returns every rank's slice to all."""

    wait_s = 0.0

    def own(self, strategy) -> Parameter:
        """Every parameter becomes a view of one flat vector; this rank owns its slice of it."""
        named, offsets = strategy._params, strategy._offsets
        self.flat = np.empty(strategy.layout.total, strategy.dtype)
        for name, p in named.items():
            view = self.flat[offsets[name] : offsets[name] + p.size].reshape(p.data.shape)
            view[...] = p.data
            p.data = view
        return Parameter(self.flat[strategy.shard])

    def on_layer(self, event: str, index: int) -> None:
        pass

    def updated(self, owned: Parameter, shard: slice) -> None:
        mine = self.flat[shard].copy()  # MPI forbids a send buffer inside the receive buffer
        allgather(mine, out=self.flat, name="zero-parameters")

    def loaded(self, owned: Parameter) -> None:
        """After the slices were overwritten (a resume): every rank gets the full parameters."""
        self.flat[...] = allgather(owned.data.copy(), name="zero-parameters")

    def nbytes(self, owned: Parameter, peak: int) -> int:
        return self.flat.nbytes


class GatheredParameters:
    """Stage 3: this rank keeps its slice only; a layer's parameters are allgathered before its
    forward and its backward (the next layer's gather prefetched on the engine) and released after."""

    def __init__(self):
        self.prefetched: dict[int, tuple] = {}  # layer index -> (handle, buffer) of a gather under way
        self.wait_s = 0.0  # this step's waits for gathers

    def own(self, strategy) -> Parameter:
        """This rank keeps its slice only; every parameter is released until its layer runs."""
        self.strategy = strategy
        shard, offsets = strategy.shard, strategy._offsets
        owned = Parameter(np.zeros(shard.stop - shard.start, strategy.dtype))
        for name, p in strategy._params.items():
            a, b = overlap(offsets[name], offsets[name] + p.size, shard.start, shard.stop)
            owned.data[a - shard.start : b - shard.start] = p.data.reshape(-1)[a - offsets[name] : b - offsets[name]]
            p.data = released(p)
        self.owned, self.shard = owned, shard
        self.layers = layer_spans(strategy.model, strategy._params, offsets)
        order = sorted(self.layers)
        self.following = {"forward": dict(zip(order, order[1:], strict=False)),
                          "backward": dict(zip(order[1:], order, strict=False))}
        return owned

    def on_layer(self, event: str, index: int) -> None:
        if index not in self.layers:
            return
        if event in ("forward", "backward"):
            self._gather(index)
            upcoming = self.following[event].get(index)
            if upcoming is not None and upcoming not in self.prefetched:
                self.prefetched[upcoming] = self._start_gather(upcoming)
        elif event in ("forward_done", "backward_done"):
            lo, hi, names = self.layers[index]
            for name in names:
                self.strategy._params[name].data = released(self.strategy._params[name])
            self.strategy._track("params", -(hi - lo) * self.owned.data.itemsize)

    def _start_gather(self, index: int) -> tuple:
        lo, hi, _ = self.layers[index]
        a, b = overlap(lo, hi, self.shard.start, self.shard.stop)
        out = np.empty(hi - lo, self.owned.data.dtype)
        self.strategy._track("params", out.nbytes)
        piece = self.owned.data[a - self.shard.start : b - self.shard.start]
        return allgather_async(piece, out=out, name=f"gather layer{index}"), out

    def _gather(self, index: int) -> None:
        handle, out = self.prefetched.pop(index, None) or self._start_gather(index)
        waiting = time.perf_counter()
        self.strategy._wait(handle)
        done = time.perf_counter()
        self.wait_s += done - waiting
        self.strategy._record(f"allgather {handle.name}", "comm", handle.started, handle.finished, tid="engine")
        self.strategy._record(f"wait for {handle.name}", "comm", waiting, done)
        lo, _, names = self.layers[index]
        for name in names:
            p = self.strategy._params[name]
            start = self.strategy._offsets[name] - lo
            p.data = out[start : start + p.size].reshape(p.data.shape)

    def updated(self, owned: Parameter, shard: slice) -> None:
        """Nothing to gather: parameters are gathered from the slices when their layer runs."""

    def loaded(self, owned: Parameter) -> None:
        """Nothing to rebuild, for the same reason."""

    def nbytes(self, owned: Parameter, peak: int) -> int:
        return owned.data.nbytes + peak


@dataclass(frozen=True)
class Stage:
    """What a ZeRO stage shards: gradients (reduce-scattered bucket buffers instead of the fusion
    buffer) and where parameters live."""

    shards_gradients: bool
    parameters: type


ZERO_STAGES = {
    1: Stage(shards_gradients=False, parameters=WholeParameters),
    2: Stage(shards_gradients=True, parameters=WholeParameters),
    3: Stage(shards_gradients=True, parameters=GatheredParameters),
}
STAGES = tuple(ZERO_STAGES)


class ShardedOptimizer(DistributedOptimizer):
    """ZeRO stage `stage` around `optimizer` and `model`: the same arguments as DistributedOptimizer
    (stages 2 and 3 also take `buckets_in_flight`; they need a Sequential model and no compression).

    Rank r's slice of the flat vector, the optimizer retargeted at it (so the whole optimizer
    state is never created), checkpoints as slices; the stage's components do the rest.
    """

    def __init__(self, optimizer, model, stage: int = 1, buckets_in_flight: int = 2, **kwargs):
        if stage not in ZERO_STAGES:
            raise ValueError(f"ZeRO stage {stage} is not implemented; available: {STAGES}")
        self.stage, spec = stage, ZERO_STAGES[stage]
        if spec.shards_gradients and kwargs.get("compression"):
            raise ValueError(f"ZeRO stage {stage} reduce-scatters float32 gradients: compression "
                             f"{kwargs['compression']!r} is only available with stage 0 or 1")
        self._live = {"grads": 0, "params": 0}
        self.peak = {"grads": 0, "params": 0}  # high-water marks of transient buffers, bytes
        named = model.named_parameters()
        self.dtype = next(iter(named.values())).data.dtype
        counts, offsets = partition(sum(p.size for p in named.values()), engine().comm.Get_size())
        rank = engine().comm.Get_rank()
        self.shard = slice(offsets[rank], offsets[rank] + counts[rank])
        self._shards = list(zip(offsets, counts, strict=True))  # (start, count) of every rank's slice
        reducer = None
        if spec.shards_gradients:
            reducer = ShardedBuckets(model, np.zeros(counts[rank], self.dtype), self.shard, self._shards,
                                     buckets_in_flight, self._track, self._wait, stage)
        super().__init__(optimizer, model, reducer=reducer, **kwargs)  # broadcasts parameters (state if created)
        self.parameters = spec.parameters()
        self.owned = self.parameters.own(self)
        self.owned.grad = reducer.into if reducer else self.reducer.flat[self.shard]
        if spec.shards_gradients:  # one hook, parameters first: a layer's are gathered before its buffers open
            model.register_layer_hook(self._layer_event)
        optimizer.retarget({"shard": self.owned},
                           {"shard": {kind: self.owned.data * 0 for kind in optimizer.state_kinds}})

    def _layer_event(self, event: str, index: int, layer) -> None:
        self.parameters.on_layer(event, index)
        self.reducer.on_layer(event, index)

    def _wait(self, handle) -> None:
        self._engine.wait_watched(handle, self.stall_warning_s, self.stall_abort_s)

    def _track(self, kind: str, nbytes: int) -> None:
        self._live[kind] += nbytes
        self.peak[kind] = max(self.peak[kind], self._live[kind])

    def zero_grad(self) -> None:
        super().zero_grad()
        self.parameters.wait_s = 0.0

    def synchronize(self) -> None:
        super().synchronize()
        self.exposed_s += self.parameters.wait_s

    def step(self) -> None:
        self.synchronize()
        self.optimizer.step()  # this rank's slice only
        self.parameters.updated(self.owned, self.shard)

    # -- what this rank holds --------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds."""
        return sum(a.nbytes for a in self.optimizer.state_arrays().values())

    def held_bytes(self) -> dict:
        params = self.parameters.nbytes(self.owned, self.peak["params"])
        grads = self.reducer.nbytes() + self.peak["grads"]
        state = self.state_bytes()
        return {"params": params, "grads": grads, "state": state, "total": params + grads + state,
                "transient": self.peak["grads"] + self.peak["params"]}

    def shard_arrays(self) -> dict:
        """This rank's slices of the flat parameter and optimizer-state vectors (for checkpoints)."""
        arrays = {"params": self.owned.data}
        arrays.update({f"state/{kind}": a for kind, a in self.optimizer.state["shard"].items()})
        return arrays

    def shards_loaded(self) -> None:
        """After shard_arrays() were overwritten (a resume): parameters rebuilt as the stage keeps them."""
        self.parameters.loaded(self.owned)

    def full_parameters(self) -> dict:
        """Every parameter, whole, by name (collective): for evaluation elsewhere or export."""
        flat = allgather(self.owned.data.copy(), name="zero-full-parameters")
        return {name: flat[offset : offset + self._params[name].size].reshape(self._params[name].data.shape)
                for name, offset in self._offsets.items()}

    def checkpoint_layout(self) -> list:
        """[name, shape] in flat order: what a sharded checkpoint must match."""
        return [[name, list(self._params[name].data.shape)] for name in sorted(self._offsets, key=self._offsets.get)]

    # -- the Strategy's checkpoints: this rank's slices of the flat vectors --------------------------

    def checkpoint_arrays(self) -> dict:
        total = sum(p.size for p in self._params.values())
        return {f"zero/{name}": Slab(a, self.shard.start, total) for name, a in self.shard_arrays().items()}

    def load_checkpoint(self, arrays: dict, steps: int) -> None:
        for name, slab in self.checkpoint_arrays().items():
            slab.data[...] = arrays[name]
        self.shards_loaded()
        self.optimizer.steps = steps

"""Data parallel with one copy of the parameters and optimizer state per node.

With P ranks on a node, plain data parallelism keeps P replicas and applies the
same update P times: P times the memory traffic of one update, on a node whose
memory bandwidth the ranks share. Here the node holds a single copy in shared
memory, and node rank l owns piece l of every gradient bucket:

- during backward, a complete bucket is reduced on the engine so that this rank's
  piece of its fusion buffer holds the mean over every rank (peers' pieces read
  straight from their fusion buffers; across nodes the ranks with the same local
  rank allreduce the piece), instead of every rank receiving the whole bucket;
- `step()` updates this rank's pieces of the node's parameters and state, then a
  node barrier publishes them before any rank's next forward.

The result is the data-parallel update: optimizers are element-wise, so pieces
updated separately equal the whole. Parameters and state stay addressable by name
(views into the node's copy), so broadcasts and checkpoints work unchanged.
"""

from __future__ import annotations

import time

from .. import runtime
from ..comm import node_barrier, node_piece, node_shared_array
from ..nn.module import Parameter
from .distributed import DistributedOptimizer
from .reducers import NodeMean


class NodeSharedOptimizer(DistributedOptimizer):
    """DistributedOptimizer whose replicas are shared per node; same constructor arguments.

    Gradient compression is not offered (pieces are reduced in float32 where they lie).
    """

    def __init__(self, optimizer, model, **kwargs):
        if kwargs.get("compression"):
            raise ValueError(f"node-shared data parallelism reduces gradients in place: compression "
                             f"{kwargs['compression']!r} is only available without it")
        super().__init__(optimizer, model, reducer=NodeMean(), **kwargs)  # parameters, state broadcast privately
        comm = self._engine.comm
        grads = self.reducer.flat
        total, dtype = grads.size, grads.dtype
        a, b = node_piece(total, comm=comm)
        self.params_flat = self._share({name: p.data for name, p in self._params.items()}, total, dtype, a, b)
        created = optimizer.state if optimizer.has_state else {}  # never created: the node's copy starts at zero
        self.state_flat = {kind: self._share({name: s[kind] for name, s in created.items()}, total, dtype, a, b)
                           for kind in optimizer.state_kinds}
        node_barrier(comm=comm)  # every piece copied in before anyone reads the node's copy
        for name, p in self._params.items():
            p.data = self._view(self.params_flat, name)
        optimizer.retarget(self._params, {name: {kind: self._view(flat, name) for kind, flat in self.state_flat.items()}
                                          for name in self._params})
        self._pieces, self._piece_state = {}, {}
        for bucket in self.buckets:
            lo, hi = node_piece(bucket.stop - bucket.start, comm=comm)
            lo, hi = bucket.start + lo, bucket.start + hi
            piece = Parameter(self.params_flat[lo:hi])
            piece.grad = grads[lo:hi]
            key = f"bucket{bucket.index}"
            self._pieces[key] = piece
            self._piece_state[key] = {kind: flat[lo:hi] for kind, flat in self.state_flat.items()}

    def _view(self, flat, name: str):
        offset, p = self._offsets[name], self._params[name]
        return flat[offset : offset + p.size].reshape(p.data.shape)

    def _share(self, arrays: dict, total: int, dtype, a: int, b: int):
        """A node-shared flat vector in the fusion layout; this rank copies in elements [a, b)."""
        flat = node_shared_array(total, dtype, comm=self._engine.comm)
        flat[a:b] = 0  # elements no array covers
        for name, array in arrays.items():
            offset = self._offsets[name]
            lo, hi = max(a, offset), min(b, offset + array.size)
            if lo < hi:
                flat[lo:hi] = array.reshape(-1)[lo - offset : hi - offset]
        return flat

    def step(self) -> None:
        self.synchronize()
        self.optimizer.apply(self._pieces, self._piece_state)  # this rank's pieces of the node's copy
        waiting = time.perf_counter()
        node_barrier()
        done = time.perf_counter()
        self._record("node barrier", "comm", waiting, done)
        self.exposed_s += done - waiting

    def held_bytes(self) -> dict:
        """Gradients are this rank's; parameters and state count this rank's share of the node's copy."""
        share = runtime.local_size()
        params = self.params_flat.nbytes // share
        state = sum(flat.nbytes for flat in self.state_flat.values()) // share
        grads = self.reducer.nbytes()
        return {"params": params, "grads": grads, "state": state, "total": params + grads + state, "transient": 0}

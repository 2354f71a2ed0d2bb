"""ZeRO stage 1: optimizer state sharded over the ranks (Rajbhandari et al., SC'20).

Gradients are averaged exactly as in DistributedOptimizer (fusion buffer, buckets
reduced on the engine while backward runs). Parameters live in one flat buffer
laid out like the gradients; rank r owns the contiguous slice `partition(n, p)[r]`
of both, keeps optimizer state for that slice only (memory per rank ~1/p), updates
it, and an allgather puts every rank's updated slice back in everyone's buffer.
Stages 2 and 3 (sharded gradients, sharded parameters) are not implemented yet.
"""

from __future__ import annotations

import numpy as np

from ..comm import allgather, partition
from ..nn.module import Parameter
from .distributed import DistributedOptimizer

STAGES = (1,)


class ShardedOptimizer(DistributedOptimizer):
    def __init__(self, optimizer, model, stage: int = 1, **kwargs):
        if stage not in STAGES:
            raise ValueError(f"ZeRO stage {stage} is not implemented; available: {STAGES}")
        super().__init__(optimizer, model, **kwargs)  # broadcasts parameters and the full state first
        self.stage = stage
        named = model.named_parameters()
        self.params_flat = np.empty(self.flat.size, self.flat.dtype)
        for name, p in named.items():  # parameters laid out exactly like their gradients
            offset = self._offsets[name]
            view = self.params_flat[offset : offset + p.size].reshape(p.data.shape)
            view[...] = p.data
            p.data = view
        counts, offsets = partition(self.flat.size, self.size)
        rank = self._engine.comm.Get_rank()
        self.shard = slice(offsets[rank], offsets[rank] + counts[rank])
        owned = Parameter(self.params_flat[self.shard])
        owned.grad = self.flat[self.shard]
        kinds = next(iter(optimizer.state.values())).keys()
        optimizer.params = {"shard": owned}
        optimizer.state = {"shard": {kind: owned.data * 0 for kind in kinds}}

    def step(self) -> None:
        self.synchronize()
        self.optimizer.step()  # this rank's slice only
        mine = self.params_flat[self.shard].copy()  # MPI forbids a send buffer inside the receive buffer
        allgather(mine, out=self.params_flat, name="zero1-parameters")

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds."""
        return sum(a.nbytes for a in self.optimizer.state_arrays().values())

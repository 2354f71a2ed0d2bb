"""The trainer's `optim.Strategy` for torch modules: a torch optimizer of the job's [optimizer]
section under our DistributedOptimizer (replicas, or one copy per node).

The job keeps its meaning: the same optimizers (sgd, adam, adamw) and hyperparameters, the
learning-rate schedule of [schedule] applied before each step, [distributed]'s buckets,
compression, passes and node-shared copy. Checkpoints hold the module's state_dict
(parameters and buffers) as `model/<key>` and the optimizer's state as
`optimizer/<parameter>/<entry>`, whole arrays that every rank holds alike, so resuming
works at any rank count. The optimizer's state exists from the start (zeros, step 0: what
these optimizers start from), so a fresh job can be matched against any checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch

from ..comm import node_barrier
from ..optim.factory import build_schedule, uses_node_shared
from ..optim.strategy import ReplicatedState
from .node_shared import state_kinds
from .optimizer import DistributedOptimizer
from .tensors import as_array


def build_torch_optimizer(job, params) -> torch.optim.Optimizer:
    o = job.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def _zero_state(optimizer: torch.optim.Optimizer) -> dict:
    """The state these optimizers start from, made now: zeros for per-element entries, 0 for scalars."""
    state, index = {}, 0
    for group, kinds in zip(optimizer.param_groups, state_kinds(optimizer), strict=True):
        for p in group["params"]:
            entries = {kind: torch.zeros_like(p) for kind in kinds.elementwise}
            entries.update({kind: torch.tensor(0.0, dtype=dtype) if isinstance(dtype, torch.dtype) else dtype(0)
                            for kind, dtype in kinds.scalars.items()})
            if entries:
                state[index] = entries
            index += 1
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


class TorchStrategy(ReplicatedState):
    """Data parallel for a torch module, driven through the Strategy protocol (what ReplicatedState
    says of ranks in lockstep, evaluation and metrics holds; checkpoints are by torch's names)."""

    def __init__(self, module: torch.nn.Module, job, total_steps: int, timeline=None):
        self.module = module
        self.schedule = build_schedule(job, total_steps)
        dist = job.distributed
        trainable = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = DistributedOptimizer(
            build_torch_optimizer(job, trainable), module, bucket_mb=dist.bucket_mb,
            compression=None if dist.compression == "none" else dist.compression,
            backward_passes_per_step=dist.backward_passes_per_step, node_shared=uses_node_shared(job),
            stall_warning_s=dist.stall_warning_s, stall_abort_s=dist.stall_abort_s)
        self.optimizer.load_state_dict(_zero_state(self.optimizer.optimizer))
        self.passes_per_step = dist.backward_passes_per_step
        names = {id(p): name for name, p in module.named_parameters()}
        self._names = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        self._steps = 0

    @property
    def exposed_s(self) -> float:
        return self.optimizer.exposed_s

    @property
    def lr(self) -> float:
        return self.schedule(self._steps)

    @property
    def steps(self) -> int:
        return self._steps

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.step()
        self._steps += 1

    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoint_arrays(self) -> dict:
        arrays = {f"model/{key}": as_array(t) for key, t in self.module.state_dict().items()}
        for index, entries in self.optimizer.state_dict()["state"].items():
            arrays.update({f"optimizer/{self._names[index]}/{kind}": as_array(torch.as_tensor(value))
                           for kind, value in entries.items()})
        return arrays

    def load_checkpoint(self, arrays: dict, steps: int) -> None:
        with torch.no_grad():
            for key, target in self.module.state_dict().items():
                target.copy_(torch.from_numpy(np.asarray(arrays[f"model/{key}"])))
        saved = self.optimizer.state_dict()
        state = {index: {kind: torch.from_numpy(np.array(arrays[f"optimizer/{self._names[index]}/{kind}"]))
                         for kind in entries} for index, entries in saved["state"].items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        node_barrier()  # node-shared parameters: every rank of a node wrote them before anyone reads
        self._steps = steps

    def close(self) -> None:
        self.optimizer.close()

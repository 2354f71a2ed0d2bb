"""Where the torch DistributedOptimizer keeps parameters and optimizer state: its two placements.

`Replicas`: every rank holds whole parameters and state; buckets are allreduced and the
wrapped optimizer steps everything. `node_shared.NodeShared`: one copy per node in shared
memory, buckets reduce-scattered, each rank steps its pieces. The optimizer talks to either
through `Placement` alone.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..optim.reducers import finish_mean, start_mean


class Placement(Protocol):
    """What the DistributedOptimizer asks of a placement.

    - `compresses`: whether buckets may travel in 16 bits (`wire` buffers).
    - `start(grads, wire, size, name)`: start reducing one bucket's gradients on the engine (a handle);
      `finish(grads, wire)` once the handle is done.
    - `complete(joined)`: after every bucket is reduced, make this rank's gradients the whole average
      (`joined`: the node ranks that have joined, whose share of the update the others prepare now).
    - `norm_terms(complete)`: the gradient tensors this rank accounts for in a global norm, and
      whether the ranks of a node must sum their terms (each holds a different piece) or not (each
      holds all); `complete`: every rank of the node holds whole gradients now.
    - `step(used, joined)`: the update, `used[i]` saying whether any rank's backward reached
      parameter i, `joined` the node ranks that have run out of data (`join()`: their share of the
      update falls to the others); `publish()`: make it visible to every rank that reads the
      parameters.
    - `state` / `state_dict()` / `load_state_dict(d)`: the wrapped optimizer's state, in its format.
    """

    compresses: bool

    def start(self, grads: np.ndarray, wire: np.ndarray | None, size: int, name: str): ...

    def finish(self, grads: np.ndarray, wire: np.ndarray | None) -> None: ...

    def complete(self, joined: tuple[int, ...] = ()) -> None: ...

    def norm_terms(self, complete: bool) -> tuple[list[torch.Tensor], bool]: ...

    def step(self, used: np.ndarray, joined: tuple[int, ...]) -> None: ...

    def publish(self) -> None: ...

    @property
    def state(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


class Replicas:
    """Whole parameters and optimizer state on every rank (what DDP and Horovod do)."""

    compresses = True

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def start(self, grads, wire, size: int, name: str):
        return start_mean(grads, wire, size, name)

    def finish(self, grads, wire) -> None:
        if wire is not None:
            finish_mean(wire, grads)

    def complete(self, joined: tuple[int, ...] = ()) -> None:
        pass

    def norm_terms(self, complete: bool) -> tuple[list[torch.Tensor], bool]:
        return [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None], False

    def step(self, used: np.ndarray, joined: tuple[int, ...]) -> None:
        self.optimizer.step()  # a rank that joined does not step: join() gives it the others' replica at the end

    def publish(self) -> None:
        pass

    @property
    def state(self) -> dict:
        return self.optimizer.state

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

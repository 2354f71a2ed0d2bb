"""The Strategy protocol: how one training step turns local gradients into parameters.

A strategy owns everything between "backward has produced this rank's gradients"
and "the parameters of the next step are in place": reducing gradients across
ranks, the optimizer update, and which arrays a checkpoint holds. The trainer
drives every strategy through this protocol alone (no type checks, no reaching
into a wrapped optimizer), so data parallel, node-shared, ZeRO 1/2/3 and the
parameter-server modes are interchangeable, and adding one is one class plus one
line in `factory.STRATEGIES`.

Checkpoint arrays are either whole arrays, which every rank holds alike, or
`checkpoint.Slab`s, this rank's slice of a flat array (ZeRO); a strategy whose
slices must match a parameter layout says so with `checkpoint_layout()`.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from .. import preemption
from ..comm import node_barrier


class Strategy(Protocol):
    """What the trainer calls, once per step: `zero_grad()`, then the model's backward
    passes (`passes_per_step` of them, their gradients summed), then `step()`.

    - `lr`: the learning rate the next `step()` applies; `steps`: updates applied so far.
    - `exposed_s`: seconds the last step waited for communication.
    - `lockstep`: every rank takes every step together (collectives between steps are safe);
      False where workers run at their own pace (the parameter server).
    - `can_checkpoint`, `checkpoint_arrays()` / `checkpoint_layout()` / `load_checkpoint(arrays, steps)`:
      whether checkpoints are possible, what one holds, by name, and putting it back (collective).
    - `agree_to_stop(signum)`: called after every step with the preemption signal this rank
      received (0: none); returns the signal to stop for, 0 to go on. Ranks in lockstep agree
      (a collective: all stop at the same step); workers at their own pace learn of another
      worker's stop at their next step, without a collective.
    - `evaluation_parameters()`: a context in which the model holds the parameters to
      evaluate (collective).
    - `step_metrics(steps)` / `run_metrics()`: the strategy's own figures for the last
      `steps` steps and for the whole run (e.g. staleness).
    - `close()`: release what the strategy holds across ranks (collective).
    """

    passes_per_step: int
    exposed_s: float
    lockstep: bool
    can_checkpoint: bool

    @property
    def lr(self) -> float: ...

    @property
    def steps(self) -> int: ...

    def zero_grad(self) -> None: ...

    def step(self) -> None: ...

    def agree_to_stop(self, signum: int) -> int: ...

    def checkpoint_arrays(self) -> dict: ...

    def checkpoint_layout(self) -> list | None: ...

    def load_checkpoint(self, arrays: dict, steps: int) -> None: ...

    def evaluation_parameters(self) -> contextlib.AbstractContextManager: ...

    def step_metrics(self, steps: int) -> dict: ...

    def run_metrics(self) -> dict: ...

    def close(self) -> None: ...


class ReplicatedState:
    """The Strategy methods of strategies whose ranks hold whole parameters and optimizer state
    (every rank alike, or one copy per node): checkpoints by name, ranks in lockstep, nothing
    to release. Needs `self.model` and `self.optimizer` (the wrapped `optim.Optimizer`)."""

    lockstep = True
    can_checkpoint = True

    @property
    def steps(self) -> int:
        return self.optimizer.steps

    def agree_to_stop(self, signum: int) -> int:
        return preemption.agreed_signal(signum)

    def checkpoint_arrays(self) -> dict:
        arrays = {f"model/{name}": p.data for name, p in self.model.named_parameters().items()}
        arrays.update({f"optimizer/{name}": a for name, a in self.optimizer.state_arrays().items()})
        return arrays

    def checkpoint_layout(self) -> list | None:
        return None

    def load_checkpoint(self, arrays: dict, steps: int) -> None:
        for name, target in self.checkpoint_arrays().items():
            target[...] = arrays[name]
        node_barrier()  # node-shared parameters: every rank of a node wrote them before anyone reads
        self.optimizer.steps = steps

    def evaluation_parameters(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def step_metrics(self, steps: int) -> dict:
        return {}

    def run_metrics(self) -> dict:
        return {}

    def close(self) -> None:
        pass

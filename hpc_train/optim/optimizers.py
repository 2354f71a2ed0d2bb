"""SGD (momentum, Nesterov, weight decay) and Adam / AdamW, on named parameters.

Optimizer state is one array per parameter and kind, addressable by name for
broadcasts and checkpoints. It is created at first use, not at construction: a
strategy that shards it (ZeRO) retargets the optimizer at its slice first and so
never holds the whole state, even for a moment. Host
arrays of float32/float64 are updated by the fused C loops of fused.c (one pass
over memory instead of about ten); everything else goes through hpc_train.kernels
(the CUDA kernels for CuPy float32 arrays, the NumPy references otherwise, which
are also what `fused=False` runs).
"""

from __future__ import annotations

import numpy as np

from .. import kernels, native
from .schedules import constant

_FUSED_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


def fused_kernel(name: str, *arrays):
    """The C update `name` for these arrays, or None where the NumPy reference must run."""
    first = arrays[0]
    suffix = _FUSED_DTYPES.get(getattr(first, "dtype", None))
    if suffix is None or not all(type(a) is np.ndarray or isinstance(a, np.ndarray) for a in arrays):
        return None
    if not all(a.dtype == first.dtype and a.flags.c_contiguous for a in arrays):
        return None
    module = native.load("hpc_train.optim", "fused.c", "_fused")
    return getattr(module, f"{name}_{suffix}") if module is not None else None


class Optimizer:
    def __init__(self, params, lr, state_kinds: tuple[str, ...] = (), fused: bool = True):
        named = params.named_parameters() if hasattr(params, "named_parameters") else dict(params)
        if not named:
            raise ValueError("optimizer got no parameters")
        self.params = named
        self.schedule = lr if callable(lr) else constant(float(lr))
        self.steps = 0
        self.fused = fused
        self.state_kinds = state_kinds
        self._state: dict | None = None

    @property
    def state(self) -> dict:
        """name -> {kind: array}; zeros until a step writes them (created here at first use)."""
        if self._state is None:
            self._state = {name: {kind: p.data * 0 for kind in self.state_kinds} for name, p in self.params.items()}
        return self._state

    @property
    def has_state(self) -> bool:
        """Whether the state arrays exist yet (until then they would all be zeros)."""
        return self._state is not None

    @property
    def lr(self) -> float:
        return self.schedule(self.steps)

    def retarget(self, params: dict, state: dict) -> None:
        """Update other arrays from now on: `params` name -> Parameter and `state` name -> {kind: array}
        (every kind of `state_kinds`). Strategies point the optimizer at a shard or at a node's shared copy."""
        for name in params:
            if set(state[name]) != set(self.state_kinds):
                raise ValueError(f"state of {name!r} has kinds {sorted(state[name])}, the optimizer "
                                 f"keeps {sorted(self.state_kinds)}")
        self.params, self._state = params, state

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.zero_grad()

    def step(self) -> None:
        self.apply(self.params, self.state)

    def apply(self, params: dict, state: dict) -> None:
        """One step on `params` (name -> Parameter) with `state` (name -> {kind: array}).

        The updates are element-wise, so any split of the parameters into pieces
        updated separately gives the same result: the node-shared optimizer updates
        only this rank's pieces of the node's copy.
        """
        lr = self.lr
        for name, p in params.items():
            p.materialize()
            self._update(p, state[name], lr)
        self.steps += 1

    def _update(self, p, state: dict, lr: float) -> None:
        raise NotImplementedError

    def state_arrays(self) -> dict:
        """Every state array by '<parameter>/<kind>' (for broadcast and checkpoints)."""
        return {f"{name}/{kind}": a for name, kinds in self.state.items() for kind, a in kinds.items()}


class SGD(Optimizer):
    """PyTorch's SGD: g = grad + wd*w; buf = m*buf + g; w -= lr * (g + m*buf if nesterov else buf)."""

    def __init__(self, params, lr, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 fused: bool = True):
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        super().__init__(params, lr, ("momentum",) if momentum else (), fused)
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay

    def _update(self, p, state, lr):
        buf = state.get("momentum")
        kernel = self.fused and fused_kernel("sgd", p.data, p.grad, *([buf] if buf is not None else []))
        if kernel:
            kernel(p.data, p.grad, buf, lr, self.momentum, self.weight_decay, self.nesterov, self.steps == 0)
            return
        kernels.sgd_update(p.data, p.grad, buf, lr, self.momentum, self.weight_decay, self.nesterov,
                           self.steps == 0)


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; `decoupled=True` is AdamW (Loshchilov & Hutter)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled: bool = False, fused: bool = True):
        super().__init__(params, lr, ("exp_avg", "exp_avg_sq"), fused)
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay, self.decoupled = eps, weight_decay, decoupled

    def _update(self, p, state, lr):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        kernel = self.fused and fused_kernel("adam", p.data, p.grad, m, v)
        if kernel:
            kernel(p.data, p.grad, m, v, lr, self.beta1, self.beta2, self.eps, self.weight_decay,
                   self.decoupled, self.steps + 1)
            return
        kernels.adam_update(p.data, p.grad, m, v, lr, self.beta1, self.beta2, self.eps, self.weight_decay,
                            self.decoupled, self.steps + 1)


def AdamW(params, lr, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,  # noqa: N802
          fused: bool = True) -> Adam:
    """Adam with decoupled weight decay."""
    return Adam(params, lr, betas, eps, weight_decay, decoupled=True, fused=fused)

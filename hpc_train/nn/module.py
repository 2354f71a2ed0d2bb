"""Parameters, modules and the Sequential container.

Layers compute `forward(x)` and `backward(dy)` explicitly on numpy or cupy arrays;
`backward` accumulates into each parameter's `grad` (so gradients can be views
into one fusion buffer) and returns the gradient of the input. Sequential runs
backward in reverse and announces each layer's parameters as ready, the hook the
data-parallel optimizer uses to start reducing while backward continues.
"""

from __future__ import annotations

import numpy as np

from ..backend import xp_of


class Parameter:
    """A trainable array and its gradient (same shape and dtype).

    `zero_grad()` does not touch memory: it marks the gradient stale, and the next
    `accumulate` overwrites it instead of adding (a GEMM writes its result straight
    into the gradient, with no temporary and no memset). `materialize()` zeroes a
    stale gradient that no backward wrote (an unused parameter) before it is read.
    """

    __slots__ = ("data", "grad", "stale")

    def __init__(self, data):
        self.data = data
        self.grad = data * 0
        self.stale = False

    @property
    def size(self) -> int:
        return self.data.size

    def zero_grad(self) -> None:
        self.stale = True

    def materialize(self) -> None:
        if self.stale:
            self.grad[...] = 0
            self.stale = False

    def accumulate(self, value) -> None:
        """grad += value (grad = value when stale)."""
        if self.stale:
            self.grad[...] = value
            self.stale = False
        else:
            self.grad += value

    def accumulate_matmul(self, a, b, rows: tuple[int, int] | None = None) -> None:
        """grad[rows] += a @ b without a temporary when stale.

        Row blocks must be given in order: the gradient stops being stale when the
        last block is written.
        """
        lo, hi = rows if rows is not None else (0, self.grad.shape[0])
        target = self.grad if rows is None else self.grad[lo:hi]
        if self.stale:
            xp_of(a).matmul(a, b, out=target)
            self.stale = hi < self.grad.shape[0]
        else:
            target += a @ b


class Module:
    """Base class: parameters by name, training flag, zeroing gradients."""

    training = True
    # Set by Sequential during backward when someone listens: grad_ready(name, start, stop)
    # announces that elements [start, stop) of parameter `name`'s gradient are final.
    grad_ready = None

    def own_parameters(self) -> dict[str, Parameter]:
        """This layer's parameters by local name (`weight`, `bias`, ...), in a fixed order."""
        return {k: v for k, v in vars(self).items() if isinstance(v, Parameter)}

    def named_parameters(self) -> dict[str, Parameter]:
        return self.own_parameters()

    def parameters(self) -> list[Parameter]:
        return list(self.named_parameters().values())

    def train(self, mode: bool = True) -> Module:
        self.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def backward(self, dy, input_grad: bool = True):
        """Accumulate parameter gradients; return d/dx, or None when input_grad is False
        and the layer can skip computing it."""
        raise NotImplementedError(f"{type(self).__name__} has no backward")


class Sequential(Module):
    """Layers applied in order; parameters named '<index>.<name>' as in PyTorch."""

    def __init__(self, *layers: Module):
        self.layers = list(layers)
        self._grad_hooks: list = []
        self._layer_hooks: list = []

    def named_parameters(self) -> dict[str, Parameter]:
        named = {}
        for i, layer in enumerate(self.layers):
            for name, p in layer.named_parameters().items():
                named[f"{i}.{name}"] = p
        return named

    def train(self, mode: bool = True) -> Sequential:
        self.training = mode
        for layer in self.layers:
            layer.train(mode)
        return self

    def register_grad_hook(self, hook) -> None:
        """hook(name, parameter, start, stop) runs as soon as backward has finished elements
        [start, stop) of that parameter's flattened gradient: the whole parameter after its
        layer's backward, or row blocks while a large Linear layer is still computing."""
        self._grad_hooks.append(hook)

    def register_layer_hook(self, hook) -> None:
        """hook(event, index, layer) runs around every layer's forward and backward, event being
        "forward", "forward_done", "backward" or "backward_done": where sharded parameters are
        gathered before use and released after (ZeRO stage 3)."""
        self._layer_hooks.append(hook)

    def _notify(self, event: str, index: int, layer: Module) -> None:
        for hook in self._layer_hooks:
            hook(event, index, layer)

    def _announcer(self, index: int, layer: Module, announced: set):
        params = layer.named_parameters()

        def announce(name: str, start: int, stop: int) -> None:
            announced.add(name)
            for hook in self._grad_hooks:
                hook(f"{index}.{name}", params[name], start, stop)

        return announce

    def forward(self, x):
        if not self._layer_hooks:
            for layer in self.layers:
                x = layer.forward(x)
            return x
        for i, layer in enumerate(self.layers):
            self._notify("forward", i, layer)
            x = layer.forward(x)
            self._notify("forward_done", i, layer)
        return x

    def backward(self, dy, input_grad: bool = False):
        """Backward through every layer; the model's input gradient only when asked for.

        Without it, backward stops at the first layer that has parameters and tells
        that layer to skip its input gradient (for an MLP, a GEMM as large as the
        first layer's forward).
        """
        first = 0 if input_grad else next(
            (i for i, layer in enumerate(self.layers) if layer.named_parameters()), len(self.layers))
        for i in range(len(self.layers) - 1, first - 1, -1):
            layer = self.layers[i]
            self._notify("backward", i, layer)
            if not self._grad_hooks:
                dy = layer.backward(dy, input_grad=input_grad or i > first)
                self._notify("backward_done", i, layer)
                continue
            announced: set = set()
            layer.grad_ready = announce = self._announcer(i, layer, announced)
            try:
                dy = layer.backward(dy, input_grad=input_grad or i > first)
            finally:
                layer.grad_ready = None
            self._notify("backward_done", i, layer)
            for name, p in layer.named_parameters().items():
                if name not in announced:
                    announce(name, 0, p.size)
        return dy

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())


def default_rng(seed) -> np.random.Generator:
    """The generator layers draw initial weights and dropout masks from (always on the host)."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

"""The model interface the trainer drives, whatever framework computes the model.

The trainer never touches layers, losses or framework tensors: it asks a
`TrainableModel` for a batch's loss, then its backward, then evaluation sums that
ranks add up. Strategies (`optim.build_strategy`) wrap `module`, the framework's
own model, to reduce its gradients. `Classifier` is the implementation for our
NumPy `nn` models; a PyTorch module gets the same interface from
`hpc_train.torch`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .layers import Dropout
from .losses import SoftmaxCrossEntropy


class TrainableModel(Protocol):
    """A model with its loss, as the trainer sees it.

    - `module`: what a strategy wraps (parameters by name, gradient hooks).
    - `forward_loss(x, y)` runs forward and returns the mean loss of the batch as a float;
      `backward()` then computes the gradients of that loss.
    - `evaluation_sums(x, y)` returns sums over the batch that ranks add up (one
      float64 vector, the same length on every rank); `evaluation_metrics(sums)`
      turns the added sums into named metrics (`val_loss` and the model's own).
    - `rng_states()` / `set_rng_states(states)`: JSON-able states of the generators
      that make training random beyond the data order (dropout), for checkpoints.
    """

    module: object

    def forward_loss(self, x, y) -> float: ...

    def backward(self) -> None: ...

    def evaluation_sums(self, x, y) -> np.ndarray: ...

    def evaluation_metrics(self, sums: np.ndarray) -> dict: ...

    def train(self, mode: bool = True) -> None: ...

    def num_parameters(self) -> int: ...

    def rng_states(self) -> list: ...

    def set_rng_states(self, states: list) -> None: ...


class Classifier:
    """A NumPy `nn` model with softmax cross-entropy: validation loss and accuracy."""

    def __init__(self, module):
        self.module = module
        self.loss = SoftmaxCrossEntropy()

    def forward_loss(self, x, y) -> float:
        return float(self.loss.forward(self.module(x), y))

    def backward(self) -> None:
        self.module.backward(self.loss.backward())

    def evaluation_sums(self, x, y) -> np.ndarray:
        logits = self.module(x)
        return np.array([float(self.loss.forward(logits, y)) * len(y), float((logits.argmax(axis=1) == y).sum()),
                         len(y)])

    @staticmethod
    def evaluation_metrics(sums: np.ndarray) -> dict:
        loss_sum, correct, count = sums
        return {"val_accuracy": correct / count, "val_loss": loss_sum / count}

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def num_parameters(self) -> int:
        return self.module.num_parameters()

    def _generators(self) -> list:
        return [layer._rng for layer in getattr(self.module, "layers", []) if isinstance(layer, Dropout)]

    def rng_states(self) -> list:
        return [g.bit_generator.state for g in self._generators()]

    def set_rng_states(self, states: list) -> None:
        for generator, state in zip(self._generators(), states, strict=True):
            generator.bit_generator.state = state

"""A torch module as the trainer's `nn.TrainableModel`: loss, backward, evaluation sums.

Batches arrive as our loaders give them (NumPy arrays) and become tensors without a copy.
What the loss is and what evaluation reports is the job's `model.loss`, one entry of
`LOSSES`. Randomness in training (dropout) is drawn from torch's generator reseeded before
every training forward from (seed, rank, forwards so far): a checkpoint records one counter,
and a resumed run draws exactly the masks the uninterrupted run would have.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import JobFileError


class Classification:
    """Cross-entropy over classes; evaluation reports loss and accuracy."""

    @staticmethod
    def misfit(data) -> str:
        """Why this loss cannot train on `data` (a `train.build.DataShape`), or ''."""
        return "" if data.layout == "images" else (f"classifies images, but the data holds {data.layout} "
                                                   "(use model.loss = 'next_byte')")

    @staticmethod
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target.long())

    @staticmethod
    def evaluation_sums(output: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        target = target.long()
        return np.array([float(F.cross_entropy(output, target, reduction="sum")),
                         float((output.argmax(dim=1) == target).sum()), len(target)])

    @staticmethod
    def evaluation_metrics(sums: np.ndarray) -> dict:
        loss_sum, correct, count = sums
        return {"val_accuracy": correct / count, "val_loss": loss_sum / count}


class NextByte:
    """A byte-level language model: cross-entropy of every position's next byte (outputs (N, T, 256)
    for targets (N, T)); evaluation reports the loss in nats per byte and in bits per byte, the
    figure language-model papers compare (no tokenizer makes it incomparable)."""

    @staticmethod
    def misfit(data) -> str:
        if data.layout != "tokens" or data.classes != 256:
            return (f"predicts bytes, but the data holds {data.layout} of {data.classes} values "
                    "(convert text with `hpc-train data convert text`)")
        return ""

    @staticmethod
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.flatten(0, -2), target.flatten().long())

    @staticmethod
    def evaluation_sums(output: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        loss_sum = F.cross_entropy(output.flatten(0, -2), target.flatten().long(), reduction="sum")
        return np.array([float(loss_sum), target.numel()])

    @staticmethod
    def evaluation_metrics(sums: np.ndarray) -> dict:
        loss_sum, count = sums
        return {"val_loss": loss_sum / count, "val_bits_per_byte": loss_sum / count / math.log(2)}


LOSSES = {"cross_entropy": Classification, "next_byte": NextByte}


def load_factory(spec: str, source: str = "model.factory"):
    """The callable named "package.module:function"; JobFileError naming what is missing."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise JobFileError(f"'{source}' = {spec!r}: expected \"package.module:function\"")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise JobFileError(f"'{source}' = {spec!r}: cannot import {module_name}: {error}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise JobFileError(f"'{source}' = {spec!r}: {module_name} has no function {attribute!r}")
    return factory


def build_module(spec, source: str = "job file") -> torch.nn.Module:
    """The job's torch module: its factory called with `model.kwargs`, parameters from `model.seed`."""
    factory = load_factory(spec.factory, f"{source}: model.factory")
    torch.manual_seed(spec.seed)
    try:
        module = factory(**spec.kwargs)
    except TypeError as error:
        raise JobFileError(f"{source}: model.factory {spec.factory} does not take model.kwargs "
                           f"{dict(spec.kwargs)}: {error}") from None
    if not isinstance(module, torch.nn.Module):
        raise JobFileError(f"{source}: model.factory {spec.factory} returned {type(module).__name__}, "
                           f"not a torch.nn.Module")
    return module


class TorchModel:
    """`module` trained on `task`'s loss; `passes` backward passes a step (the applied gradient is their
    mean, as for our NumPy models)."""

    def __init__(self, module: torch.nn.Module, task, seed: int, rank: int, passes: int = 1):
        self.module, self.task = module, task
        self.seed, self.rank, self.passes = seed, rank, passes
        self.forwards = 0
        self._loss = None

    def forward_loss(self, x, y) -> float:
        torch.manual_seed(int(np.random.SeedSequence([self.seed, self.rank, self.forwards]).generate_state(1)[0]))
        self.forwards += 1
        self._loss = self.task.loss(self.module(torch.from_numpy(np.ascontiguousarray(x))),
                                    torch.from_numpy(np.ascontiguousarray(y)))
        return float(self._loss.detach())

    def backward(self) -> None:
        (self._loss / self.passes if self.passes > 1 else self._loss).backward()
        self._loss = None

    def evaluation_sums(self, x, y) -> np.ndarray:
        with torch.no_grad():
            output = self.module(torch.from_numpy(np.ascontiguousarray(x)))
        return self.task.evaluation_sums(output, torch.from_numpy(np.ascontiguousarray(y)))

    def evaluation_metrics(self, sums: np.ndarray) -> dict:
        return self.task.evaluation_metrics(sums)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def rng_states(self) -> list:
        return [self.forwards]

    def set_rng_states(self, states: list) -> None:
        (self.forwards,) = states

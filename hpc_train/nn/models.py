"""Reference models: `mlp` (configurable widths) and `cnn` (CIFAR-shaped 32x32x3 input)."""

from __future__ import annotations

import numpy as np

from .layers import GELU, BatchNorm, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from .module import Sequential, default_rng

ACTIVATIONS = {"relu": ReLU, "gelu": GELU}


def mlp(widths=(3072, 1024, 512, 10), *, activation: str = "relu", dropout: float = 0.0, seed: int = 0,
        dtype=np.float32, xp=np) -> Sequential:
    """Linear layers of the given widths (input first, classes last), activations between."""
    if len(widths) < 2:
        raise ValueError(f"mlp widths {widths}: need at least input and output widths")
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp activation {activation!r}: expected one of {sorted(ACTIVATIONS)}")
    rng = default_rng(seed)
    layers = [Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=False)):
        layers.append(Linear(a, b, rng=rng, dtype=dtype, xp=xp))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
            if dropout:
                layers.append(Dropout(dropout, rng=rng))
    return Sequential(*layers)


def cnn(channels=(32, 64, 128), hidden: int = 256, classes: int = 10, *, input_shape=(32, 32, 3),
        batchnorm: bool = False, sync_batchnorm: bool = False, seed: int = 0, dtype=np.float32,
        xp=np) -> Sequential:
    """Three conv-relu-pool stages (3x3, padding 1, pool 2), then two linear layers.

    The default has 0.62 M parameters for 32x32x3 input.
    """
    rng = default_rng(seed)
    height, width, previous = input_shape
    layers = []
    for c in channels:
        layers.append(Conv2d(previous, c, 3, padding=1, rng=rng, dtype=dtype, xp=xp))
        if batchnorm:
            layers.append(BatchNorm(c, sync=sync_batchnorm, dtype=dtype, xp=xp))
        layers += [ReLU(), MaxPool2d(2)]
        previous, height, width = c, height // 2, width // 2
    layers += [Flatten(), Linear(height * width * previous, hidden, rng=rng, dtype=dtype, xp=xp), ReLU(),
               Linear(hidden, classes, rng=rng, dtype=dtype, xp=xp)]
    return Sequential(*layers)


def mlp_parameters(widths) -> int:
    """How many parameters `mlp(widths)` has, without building it (a job's size is checked first)."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=False))


def cnn_parameters(channels=(32, 64, 128), hidden: int = 256, classes: int = 10, *, input_shape=(32, 32, 3),
                   batchnorm: bool = False) -> int:
    """How many parameters and statistics `cnn(...)` has, without building it."""
    height, width, previous = input_shape
    count = 0
    for c in channels:
        count += previous * c * 9 + c + (4 * c if batchnorm else 0)  # scale, shift, running mean and variance
        previous, height, width = c, height // 2, width // 2
    return count + mlp_parameters((height * width * previous, hidden, classes))


# The models a job file names ([model] name); build_model in train/build.py passes each its keys.
MODELS = {"mlp": mlp, "cnn": cnn}

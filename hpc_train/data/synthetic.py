"""The embedded default dataset: learnable, CIFAR-shaped, generated from a seed.

Each class has a prototype image built from a few smooth coloured waves with
class-specific orientations and frequencies. A sample is its class prototype at
a random contrast and shift, plus pixel noise: the classes differ by structure,
not by a single pixel or the mean colour, and a model has to learn it.
"""

from __future__ import annotations

import numpy as np


def prototypes(classes: int, shape=(32, 32, 3), seed: int = 0) -> np.ndarray:
    """(classes, H, W, C) float images in [-1, 1], one smooth pattern per class."""
    height, width, channels = shape
    rng = np.random.default_rng([seed, 7919])
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    out = np.zeros((classes, height, width, channels))
    for c in range(classes):
        for _ in range(3):
            angle = rng.uniform(0, np.pi)
            freq = rng.uniform(1.0, 4.0)
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
            out[c] += wave[..., None] * rng.uniform(-1, 1, channels)
        out[c] /= np.abs(out[c]).max()
    return out


def synthetic_classification(samples: int, shape=(32, 32, 3), classes: int = 10, seed: int = 0,
                             noise: float = 1.0, start: int = 0):
    """(images uint8 NHWC, labels int64) for samples [start, start + samples) of the set.

    Sample i depends only on (seed, i): any rank can generate any slice, and the
    same index always gives the same image.
    """
    protos = prototypes(classes, shape, seed)
    images = np.empty((samples, *shape), np.uint8)
    labels = np.empty(samples, np.int64)
    for k in range(samples):
        rng = np.random.default_rng([seed, start + k])
        label = int(rng.integers(classes))
        shifted = np.roll(protos[label], tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
        image = rng.uniform(0.5, 1.0) * shifted + noise * rng.standard_normal(shape)
        images[k] = np.clip(127.5 + 127.5 * image / (1 + noise), 0, 255).astype(np.uint8)
        labels[k] = label
    return images, labels

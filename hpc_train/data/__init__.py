"""Data: DistributedSampler, loaders, the embedded synthetic dataset."""

from .loader import ArrayLoader, to_float
from .sampler import DistributedSampler
from .synthetic import synthetic_classification

__all__ = ["ArrayLoader", "DistributedSampler", "synthetic_classification", "to_float"]

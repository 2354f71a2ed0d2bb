"""Data: DistributedSampler, loaders, the embedded synthetic dataset."""

from .hdf5_loader import HDF5Loader
from .loader import ArrayLoader, to_float
from .sampler import DistributedSampler
from .synthetic import synthetic_classification

__all__ = ["ArrayLoader", "DistributedSampler", "HDF5Loader", "synthetic_classification", "to_float"]

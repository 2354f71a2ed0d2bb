"""Data: DistributedSampler, loaders, the embedded synthetic dataset."""

from .hdf5_loader import HDF5Loader
from .loader import ArrayLoader, to_float
from .sampler import DistributedSampler
from .synthetic import synthetic_classification

DATASETS = ("synthetic", "hdf5")  # what a job file's [data] name may say: generated, or an HDF5 file

__all__ = ["DATASETS", "ArrayLoader", "DistributedSampler", "HDF5Loader", "synthetic_classification", "to_float"]

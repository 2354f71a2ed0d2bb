"""What a job file's [model] and [data] sections build: the model and this rank's loaders."""

from __future__ import annotations

import os

import numpy as np

from .. import nn
from ..data import ArrayLoader, DistributedSampler, synthetic_classification
from .config import JobFileError


def build_model(spec: dict, input_shape: tuple, classes: int) -> nn.TrainableModel:
    """The model of the job, checked against the data it will see."""
    features = int(np.prod(input_shape))
    if spec.name == "mlp":
        widths = tuple(spec.widths)
        if widths[0] != features or widths[-1] < classes:
            raise JobFileError(f"model.widths = {list(widths)} does not fit the data: images of shape "
                               f"{tuple(input_shape)} have {features} features and there are {classes} classes")
        return nn.Classifier(nn.mlp(widths, activation=spec.activation, dropout=spec.dropout,
                                    seed=spec.seed))
    if len(input_shape) != 3:
        raise JobFileError(f"model.name = 'cnn' needs (height, width, channels) images, data has {input_shape}")
    sync = spec.sync_batchnorm
    return nn.Classifier(nn.cnn(tuple(spec.channels), spec.hidden, classes, input_shape=tuple(input_shape),
                                seed=spec.seed, batchnorm=spec.batchnorm or sync, sync_batchnorm=sync))


def build_loaders(job: dict, batch: int, rank: int, size: int):
    """(train loader, validation loader, image shape, classes) for the job's data section."""
    data, train = job.data, job.train
    if data.name == "hdf5":
        from ..data import HDF5Loader

        loader = HDF5Loader(data.path, batch, collective=data.collective, prefetch=data.prefetch,
                            seed=train.seed, drop_last=train.drop_last)
        val = HDF5Loader(data.val_path, batch, collective=data.collective, prefetch=data.prefetch,
                         shuffle=False)
        classes = int(max(loader.labels.max(), val.labels.max())) + 1
        return loader, val, loader.image_shape, classes
    shape = tuple(data.shape)
    images, labels = synthetic_classification(data.train_samples, shape, data.classes, data.seed,
                                              data.noise)
    val_images, val_labels = synthetic_classification(
        data.val_samples, shape, data.classes, data.seed, data.noise, start=data.train_samples)
    sampler = DistributedSampler(len(images), rank, size, seed=train.seed, drop_last=train.drop_last)
    val_sampler = DistributedSampler(len(val_images), rank, size, shuffle=False)
    return (ArrayLoader(images, labels, batch, sampler), ArrayLoader(val_images, val_labels, batch, val_sampler),
            shape, data.classes)


def limit_threads(ranks_on_host: int) -> None:
    """One BLAS/OpenMP pool of cores // ranks threads per rank, so ranks do not fight over cores,
    and never more threads than the cores this rank is bound to (mpirun binds a lone rank to one
    core: two spinning BLAS threads on it made a step 15x slower)."""
    from threadpoolctl import threadpool_limits

    bound = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threadpool_limits(max(1, min(bound, (os.cpu_count() or 1) // ranks_on_host)))

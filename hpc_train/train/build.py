"""What a job file's [model], [data] and strategy sections build: the model, its strategy, this rank's loaders.

Model kinds sit behind one pair of builders each (`NumpyModels`, `TorchModels`, chosen by
`models_of`): the trainer sees only `nn.TrainableModel` and `optim.Strategy`."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .. import nn, optim, runtime
from ..data import ArrayLoader, DistributedSampler, synthetic_classification
from . import memory
from .config import JobFileError


@dataclass(frozen=True)
class DataShape:
    """What the model must fit: a sample's input shape, the output width the data needs (classes, or
    the vocabulary) and the data's layout ("images": a label a sample; "tokens": next-token targets)."""

    input_shape: tuple
    classes: int
    layout: str = "images"


class NumpyModels:
    """Our own `nn` models ([model] name = "mlp" | "cnn") and optim's strategies."""

    @staticmethod
    def model(job, data: DataShape, threads: int) -> nn.TrainableModel:
        spec = job.model
        input_shape, classes = data.input_shape, data.classes
        if data.layout != "images":
            raise JobFileError(f"model.name = {spec.name!r} classifies images; the data holds {data.layout} "
                               "(train those with model.name = 'torch' and a loss that fits them)")
        features = int(np.prod(input_shape))
        # read again after the loaders were built: what the data took is no longer available
        host_ranks, available = runtime.topology().host_ranks, memory.available_bytes(runtime.world())
        if spec.name == "mlp":
            widths = tuple(spec.widths)
            if widths[0] != features or widths[-1] < classes:
                raise JobFileError(f"model.widths = {list(widths)} does not fit the data: images of shape "
                                   f"{tuple(input_shape)} have {features} features and there are {classes} classes")
            memory.check_model(f"model.widths = {list(widths)}", nn.mlp_parameters(widths), host_ranks, available)
            return nn.Classifier(nn.mlp(widths, activation=spec.activation, dropout=spec.dropout,
                                        seed=spec.seed))
        if len(input_shape) != 3:
            raise JobFileError(f"model.name = 'cnn' needs (height, width, channels) images, data has {input_shape}")
        if min(input_shape[:2]) >> len(spec.channels) == 0:
            raise JobFileError(f"model.channels = {list(spec.channels)}: {len(spec.channels)} stages halve "
                               f"{tuple(input_shape[:2])} images to nothing (at most "
                               f"{min(input_shape[:2]).bit_length() - 1} stages)")
        sync = spec.sync_batchnorm
        shape = dict(input_shape=tuple(input_shape), batchnorm=spec.batchnorm or sync)
        memory.check_model(f"model.channels = {list(spec.channels)}, model.hidden = {spec.hidden}",
                           nn.cnn_parameters(tuple(spec.channels), spec.hidden, classes, **shape), host_ranks,
                           available)
        return nn.Classifier(nn.cnn(tuple(spec.channels), spec.hidden, classes, seed=spec.seed,
                                    sync_batchnorm=sync, **shape))

    @staticmethod
    def strategy(job, model, total_steps: int, timeline):
        return optim.build_strategy(job, model.module, total_steps, timeline)


class TorchModels:
    """Any torch.nn.Module from [model] factory ([model] name = "torch"), trained by hpc_train.torch."""

    @staticmethod
    def model(job, data: DataShape, threads: int) -> nn.TrainableModel:
        import torch

        from ..torch import convert_sync_batchnorm
        from ..torch.trainable import LOSSES, TorchModel, build_module

        torch.set_num_threads(threads)
        spec = job.model
        task = LOSSES[spec.loss]
        misfit = task.misfit(data)
        if misfit:
            raise JobFileError(f"model.loss = {spec.loss!r} {misfit}")
        input_shape, classes = data.input_shape, data.classes
        module = build_module(spec)
        if spec.sync_batchnorm:
            module = convert_sync_batchnorm(module)
        module.eval()
        try:  # one sample through the model now: a misfit says so here, not deep inside the first step
            with torch.no_grad():
                width = module(torch.zeros((1, *input_shape))).shape[-1]
        except Exception as error:  # noqa: BLE001 - whatever the user's model raises, named with the job's keys
            raise JobFileError(f"model.factory {spec.factory} with model.kwargs {dict(spec.kwargs)} does not take "
                               f"the data's images of shape {tuple(input_shape)}: {error}") from None
        module.train()
        if width < classes:
            raise JobFileError(f"model.factory {spec.factory} outputs {width} values a sample; the data has "
                               f"{classes} {'classes' if data.layout == 'images' else 'token values'}")
        return TorchModel(module, task, spec.seed, runtime.rank(),
                          job.distributed.backward_passes_per_step)

    @staticmethod
    def strategy(job, model, total_steps: int, timeline):
        from ..torch.strategy import TorchStrategy

        return TorchStrategy(model.module, job, total_steps, timeline)


def models_of(job):
    """What builds the job's model and strategy: our NumPy models, or torch modules."""
    return TorchModels if job.model.name == "torch" else NumpyModels


def build_loaders(job: dict, batch: int, rank: int, size: int):
    """(train loader, validation loader, DataShape) for the job's data section, after checking that
    its data and batches fit in the node's memory (`memory.py`)."""
    data, train = job.data, job.train
    host_ranks = runtime.topology().host_ranks
    available = memory.available_bytes(runtime.world())
    if data.name == "hdf5":
        from ..data import HDF5Loader

        loader = HDF5Loader(data.path, batch, collective=data.collective, prefetch=data.prefetch,
                            seed=train.seed, drop_last=train.drop_last)
        val = HDF5Loader(data.val_path, batch, collective=data.collective, prefetch=data.prefetch,
                         shuffle=False)
        if (val.layout, val.input_shape) != (loader.layout, loader.input_shape):
            raise JobFileError(f"data.val_path {data.val_path} holds {val.layout} of shape {val.input_shape}, "
                               f"data.path {data.path} holds {loader.layout} of shape {loader.input_shape}")
        memory.check_batches(train.global_batch, batch, loader.sample_shape, loader.sample_dtype.itemsize,
                             data.prefetch, host_ranks, available)
        return loader, val, DataShape(loader.input_shape, max(loader.classes, val.classes), loader.layout)
    shape = tuple(data.shape)
    memory.check_synthetic_set(data, host_ranks, available)
    memory.check_batches(train.global_batch, batch, shape, 1, data.prefetch, host_ranks, available)
    images, labels = synthetic_classification(data.train_samples, shape, data.classes, data.seed,
                                              data.noise)
    val_images, val_labels = synthetic_classification(
        data.val_samples, shape, data.classes, data.seed, data.noise, start=data.train_samples)
    sampler = DistributedSampler(len(images), rank, size, seed=train.seed, drop_last=train.drop_last)
    val_sampler = DistributedSampler(len(val_images), rank, size, shuffle=False)
    return (ArrayLoader(images, labels, batch, sampler), ArrayLoader(val_images, val_labels, batch, val_sampler),
            DataShape(shape, data.classes))


def limit_threads(ranks_on_host: int) -> int:
    """One BLAS/OpenMP pool of cores // ranks threads per rank, so ranks do not fight over cores,
    and never more threads than the cores this rank is bound to (mpirun binds a lone rank to one
    core: two spinning BLAS threads on it made a step 15x slower). Returns the thread count."""
    from threadpoolctl import threadpool_limits

    bound = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, min(bound, (os.cpu_count() or 1) // ranks_on_host))
    threadpool_limits(threads)
    return threads

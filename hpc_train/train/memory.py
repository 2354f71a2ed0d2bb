"""Memory a job's data would take, refused before it is allocated.

Every rank of a node draws on the same memory: a synthetic set is built whole on every rank, and
every rank keeps its batches in flight (the one in use, the prefetch queue, the one being read,
as stored and as float32). A job whose figures exceed what the node has available fails at once
on every rank with the key and the sizes, instead of an out-of-memory kill mid-setup. The
available figure is the smallest any rank reads, so that every rank takes the same decision.
"""

from __future__ import annotations

import os

import numpy as np

from .config import JobFileError

FLOAT_BYTES = 4  # inputs reach the model as float32


def available_bytes(comm) -> int | None:
    """MemAvailable of this node (Linux), the smallest any rank of comm reads; None where unknown."""
    from mpi4py import MPI

    mine = -1
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    mine = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if mine < 0 and hasattr(os, "sysconf"):
        try:
            mine = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            mine = -1
    known = comm.allreduce(mine if mine >= 0 else np.iinfo(np.int64).max, op=MPI.MIN)
    return None if known == np.iinfo(np.int64).max else int(known)


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def check_synthetic_set(data, host_ranks: int, available: int | None) -> None:
    """Every rank builds the whole synthetic set (uint8 images and int64 labels)."""
    if available is None:
        return
    per_rank = (data.train_samples + data.val_samples) * (int(np.prod(data.shape)) + 8)
    if per_rank * host_ranks > available:
        raise JobFileError(f"data.train_samples = {data.train_samples} and data.val_samples = {data.val_samples} of "
                           f"shape {list(data.shape)}: every rank builds the whole synthetic set, {gib(per_rank)} on "
                           f"each of this node's {host_ranks} ranks, {gib(per_rank * host_ranks)} in all, more than "
                           f"the {gib(available)} of memory available")


def check_model(what: str, parameters: int, host_ranks: int, available: int | None) -> None:
    """Every rank builds the whole model before its strategy shards or shares it: one float32 copy
    of its parameters a rank is the least any strategy needs (gradients and optimizer state come on top)."""
    if available is None:
        return
    per_rank = parameters * FLOAT_BYTES
    if per_rank * host_ranks > available:
        raise JobFileError(f"{what}: {parameters:,} parameters, {gib(per_rank)} as float32 on each of this node's "
                           f"{host_ranks} ranks (every rank builds the whole model), {gib(per_rank * host_ranks)} "
                           f"in all, more than the {gib(available)} of memory available")


def check_batches(global_batch: int, batch: int, sample_shape, stored_bytes: int, prefetch: int, host_ranks: int,
                  available: int | None) -> None:
    """A rank's batches in flight: the one in use, `prefetch` queued and one being read, each as
    stored and as float32."""
    if available is None:
        return
    per_rank = batch * int(np.prod(sample_shape)) * (stored_bytes + FLOAT_BYTES) * (prefetch + 2)
    if per_rank * host_ranks > available:
        raise JobFileError(f"train.global_batch = {global_batch}: {batch} samples of shape {list(sample_shape)} a "
                           f"rank need about {gib(per_rank)} of batches in flight on each of this node's {host_ranks} "
                           f"ranks, {gib(per_rank * host_ranks)} in all, more than the {gib(available)} of memory "
                           "available")

"""Checkpoints: one HDF5 file each, written collectively, renamed into place only when complete.

Every array (parameters, optimizer state) is a dataset; each rank writes its slab
of rows through the mpio driver. Scalars, RNG states and the job go into
attributes as JSON text: nothing is ever pickled. A file is written as
NAME.partial, flushed, fsynced and renamed, so a job killed mid-write leaves the
previous checkpoint untouched and loadable.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .comm.check import raise_if_any
from .io.hdf5 import DatasetError, open_parallel

FORMAT = "hpc_train-checkpoint-1"
_NAME = re.compile(r"^ckpt-(\d{9})\.h5$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, naming the file and the first mismatch."""


def checkpoint_path(directory, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:09d}.h5"


def complete_checkpoints(directory) -> list[Path]:
    """Finished checkpoints in step order (partial files never match the name pattern)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def _rows(n: int, comm) -> tuple[int, int]:
    p, r = comm.Get_size(), comm.Get_rank()
    base, extra = divmod(n, p)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def save(path, arrays: dict[str, np.ndarray], attrs: dict, comm) -> Path:
    """Write every array (identical on all ranks) collectively, each rank its rows; atomic rename."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if comm.Get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    comm.Barrier()
    with open_parallel(partial, "w", comm) as f:
        f.attrs["format"] = FORMAT
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value)
        for name, array in arrays.items():
            flat = np.ascontiguousarray(array).reshape(-1)
            dset = f.create_dataset(name, flat.shape, dtype=flat.dtype)
            dset.attrs["shape"] = list(array.shape)
            lo, hi = _rows(flat.size, comm)
            if flat.size >= comm.Get_size():
                with dset.collective:
                    dset[lo:hi] = flat[lo:hi]
            elif hi > lo:
                dset[lo:hi] = flat[lo:hi]
    comm.Barrier()
    if comm.Get_rank() == 0:
        fd = os.open(partial, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.replace(partial, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dir_fd)  # the rename itself survives a crash
        os.close(dir_fd)
    comm.Barrier()
    return path


def load(path, comm, expected: dict[str, tuple] | None = None) -> tuple[dict, dict]:
    """(arrays, attrs) of a checkpoint; CheckpointError on every rank if unusable.

    `expected` maps array names to the shapes the job needs; the first missing
    array or differing shape is named.
    """
    problem, arrays, attrs = None, {}, {}
    try:
        with open_parallel(path, "r", comm) as f:
            if f.attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not an hpc_train checkpoint (format {f.attrs.get('format')!r})")
            for name, shape in (expected or {}).items():
                if name not in f:
                    raise CheckpointError(f"{path}: array '{name}' is missing from the checkpoint")
                stored = tuple(int(v) for v in f[name].attrs["shape"])
                if stored != tuple(shape):
                    raise CheckpointError(f"{path}: array '{name}' has shape {stored} in the checkpoint, "
                                          f"{tuple(shape)} in the job")
            attrs = {k: json.loads(v) for k, v in f.attrs.items() if k != "format"}

            def collect(name, obj):
                if hasattr(obj, "shape"):  # datasets, not groups
                    arrays[name] = obj[...].reshape(tuple(int(v) for v in obj.attrs["shape"]))

            f.visititems(collect)
    except (CheckpointError, DatasetError, OSError, KeyError, ValueError) as exc:
        problem = str(exc) if isinstance(exc, CheckpointError) else f"{path}: unreadable checkpoint ({exc})"
    raise_if_any(comm, problem, CheckpointError)
    return arrays, attrs


def prune(directory, keep_last: int, comm) -> None:
    """Delete all but the newest keep_last complete checkpoints (rank 0)."""
    if comm.Get_rank() == 0 and keep_last > 0:
        for old in complete_checkpoints(directory)[:-keep_last]:
            old.unlink(missing_ok=True)
    comm.Barrier()

"""Checkpoints: one HDF5 file each, written collectively, renamed into place only when complete.

Every array (parameters, optimizer state) is a dataset; each rank writes its slab
of rows through the mpio driver: a share of a replicated array, or under ZeRO the
slice of the flat vectors it owns (a `Slab`), so that a rank reads back any slice
and a job resumes with a different rank count. Scalars, RNG states and the job go into
attributes as JSON text: nothing is ever pickled. A file is written as
NAME.partial, flushed, fsynced and renamed, so a job killed mid-write leaves the
previous checkpoint untouched and loadable.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .blocks import block
from .comm.check import raise_if_any
from .io.hdf5 import DatasetError, open_parallel, write_rows

FORMAT = "hpc_train-checkpoint-1"
_NAME = re.compile(r"^ckpt-(\d{9})\.h5$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, naming the file and the first mismatch."""


@dataclass
class Slab:
    """This rank's elements [start, start + data.size) of a flat array of `total` elements."""

    data: np.ndarray
    start: int
    total: int


def logical_bytes(arrays: dict) -> int:
    """Bytes the arrays fill in the file (a Slab counts its whole array)."""
    return sum(a.total * a.data.itemsize if isinstance(a, Slab) else a.nbytes for a in arrays.values())


def checkpoint_path(directory, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:09d}.h5"


def complete_checkpoints(directory) -> list[Path]:
    """Finished checkpoints in step order (partial files never match the name pattern)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def newest_step(directory) -> int:
    """The step of the newest complete checkpoint in `directory` (0 if none)."""
    found = complete_checkpoints(directory)
    return int(_NAME.match(found[-1].name).group(1)) if found else 0


def save(path, arrays: dict, attrs: dict, comm) -> Path:
    """Write every array collectively, each rank its rows; atomic rename.

    An ndarray is identical on all ranks (each writes a share of it); a Slab is
    this rank's part of an array no rank holds whole.
    """
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
            if isinstance(array, Slab):
                total, lo, rows, shape = array.total, array.start, array.data.reshape(-1), (array.total,)
            else:
                flat = np.ascontiguousarray(array).reshape(-1)
                total, shape = flat.size, array.shape
                lo, hi = block(total, comm.Get_size(), comm.Get_rank())
                rows = flat[lo:hi]
            dset = f.create_dataset(name, (total,), dtype=rows.dtype)
            dset.attrs["shape"] = list(shape)
            write_rows(dset, lo, rows, total, comm)
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


def _first_layout_mismatch(path, stored, expected) -> str | None:
    if stored is None:
        return f"{path}: written by a data-parallel job (per-parameter arrays); this job shards the model (ZeRO)"
    for (name, shape), (want, want_shape) in zip(stored, expected, strict=False):
        if name != want or shape != want_shape:
            return (f"{path}: parameter '{name}' {tuple(shape)} in the checkpoint where the job has "
                    f"'{want}' {tuple(want_shape)}")
    if len(stored) != len(expected):
        return f"{path}: {len(stored)} parameters in the checkpoint, {len(expected)} in the job"
    return None


MAX_ATTRIBUTE_BYTES = 16 << 20  # scalars, RNG states and the job are kilobytes; a larger one is not ours


def _read_attributes(f, path) -> dict:
    """Every attribute but the format mark, parsed as the JSON it was written as; checked for size first."""
    attrs = {}
    for key in f.attrs:
        if key == "format":
            continue
        size = f.attrs.get_id(key).get_storage_size()
        if size > MAX_ATTRIBUTE_BYTES:
            raise CheckpointError(f"{path}: attribute '{key}' holds {size} bytes, more than a checkpoint writes")
        value = f.attrs[key]
        if not isinstance(value, str):
            raise CheckpointError(f"{path}: attribute '{key}' is not JSON text (a {type(value).__name__})")
        try:
            attrs[key] = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path}: attribute '{key}' is not valid JSON ({exc})") from None
    return attrs


def _checked_dataset(f, path, name: str, shape: tuple, dtype):
    """The flat dataset `name`, once its kind, dtype, length and recorded shape match what the job holds."""
    if name not in f:
        raise CheckpointError(f"{path}: array '{name}' is missing from the checkpoint")
    dset = f[name]
    if not hasattr(dset, "dtype"):
        raise CheckpointError(f"{path}: '{name}' is a group in the checkpoint, not an array")
    if dtype is not None and dset.dtype != dtype:
        raise CheckpointError(f"{path}: array '{name}' has dtype {dset.dtype} in the checkpoint, {dtype} in the job")
    recorded = dset.attrs.get("shape")
    try:
        stored = tuple(int(v) for v in recorded)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: array '{name}' has no valid 'shape' attribute ({recorded!r})") from None
    if stored != tuple(shape):
        raise CheckpointError(f"{path}: array '{name}' has shape {stored} in the checkpoint, {tuple(shape)} in the job")
    if dset.shape != (int(np.prod(shape)),):
        raise CheckpointError(f"{path}: array '{name}' holds {dset.shape} elements where its shape {stored} needs "
                              f"({int(np.prod(shape))},)")
    return dset


def _recorded_shapes(f) -> dict:
    """Every array of the file with the shape its 'shape' attribute records (checked when read)."""
    shapes = {}

    def visit(name, obj):
        if hasattr(obj, "dtype"):  # datasets, not groups
            shapes[name] = tuple(obj.attrs.get("shape", obj.shape))

    f.visititems(visit)
    return shapes


def load(path, comm, expected: dict[str, tuple] | None = None, slices: dict[str, tuple] | None = None,
         layout: list | None = None, dtypes: dict | None = None) -> tuple[dict, dict]:
    """(arrays, attrs) of a checkpoint; CheckpointError on every rank if unusable.

    `expected` maps array names to the shapes the job needs: only those are read, each checked
    (kind, dtype from `dtypes`, length, recorded shape) before a byte of it, so that a file never
    decides what is allocated; the first missing array or difference is named. Without
    `expected` (a library user's own checkpoint), every array in the file is read. `slices` maps
    flat arrays to the (start, stop) this rank reads instead of the whole. `layout` ([name,
    shape] per parameter) must equal the one a sharded checkpoint was written with.
    """
    problem, arrays, attrs = None, {}, {}
    slices, dtypes = slices or {}, dtypes or {}
    try:
        with open_parallel(path, "r", comm) as f:
            if f.attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not an hpc_train checkpoint (format {f.attrs.get('format')!r})")
            attrs = _read_attributes(f, path)
            if layout is not None:
                mismatch = _first_layout_mismatch(path, attrs.get("layout"), layout)
                if mismatch:
                    raise CheckpointError(mismatch)
            if expected is None:
                expected = _recorded_shapes(f)
            for name, shape in expected.items():
                dset = _checked_dataset(f, path, name, shape, dtypes.get(name))
                if name in slices:
                    start, stop = slices[name]
                    arrays[name] = dset[start:stop]
                else:
                    arrays[name] = dset[...].reshape(shape)
    except (CheckpointError, DatasetError, OSError, KeyError, ValueError, TypeError, MemoryError,
            RecursionError, RuntimeError) as exc:  # RuntimeError: h5py's for some damaged metadata
        problem = str(exc) if isinstance(exc, CheckpointError) else f"{path}: unreadable checkpoint ({exc!r})"
    raise_if_any(comm, problem, CheckpointError)
    return arrays, attrs


def load_like(path, comm, current: dict, layout: list | None = None) -> tuple[dict, dict]:
    """`load` for a job whose own arrays are `current` (name -> array, or Slab: only its slice is read)."""
    expected = {k: (v.total,) if isinstance(v, Slab) else v.shape for k, v in current.items()}
    slices = {k: (v.start, v.start + v.data.size) for k, v in current.items() if isinstance(v, Slab)}
    dtypes = {k: (v.data if isinstance(v, Slab) else v).dtype for k, v in current.items()}
    return load(path, comm, expected, slices=slices, layout=layout, dtypes=dtypes)


def require(attrs: dict, path, schema: dict) -> None:
    """CheckpointError naming the file and attribute unless every key of `schema` is in `attrs`
    with a value its check accepts (`schema`: key -> (check, what it must be))."""
    for key, (check, must) in schema.items():
        if key not in attrs:
            raise CheckpointError(f"{path}: attribute '{key}' is missing")
        if not check(attrs[key]):
            raise CheckpointError(f"{path}: attribute '{key}' must be {must}, got {str(attrs[key])[:80]!r}")


def prune(directory, keep_last: int, comm) -> None:
    """Delete all but the newest keep_last complete checkpoints (rank 0)."""
    if comm.Get_rank() == 0 and keep_last > 0:
        for old in complete_checkpoints(directory)[:-keep_last]:
            old.unlink(missing_ok=True)
    comm.Barrier()

"""Training datasets in one HDF5 file, written and read in parallel (h5py on MPI-IO).

Two layouts, chunked along N (about 1 MiB a chunk unless told otherwise) or
contiguous, optionally aligned, with attributes for the classes and provenance:
- "images": `images` (N, ...) and `labels` (N,), a class a sample;
- "tokens": `tokens` (N, T + 1) integers, each row a window of a token stream: its
  first T tokens are the input, its last T the next-token targets (so no target is
  stored twice); attribute `classes` is the vocabulary size.
Writers write to a temporary name and rename when complete, so a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..blocks import block

IMAGES, LABELS, TOKENS = "images", "labels", "tokens"
LAYOUTS = {"images": (IMAGES, LABELS), "tokens": (TOKENS,)}  # the datasets of each layout, samples first
DEFAULT_CHUNK_BYTES = 1 << 20


class DatasetError(ValueError):
    """A dataset file that cannot be used, naming the file and the dataset at fault."""


def mpi_info(hints: dict | None):
    """MPI.Info from {'romio_cb_read': 'enable', ...}, or INFO_NULL."""
    from mpi4py import MPI

    if not hints:
        return MPI.INFO_NULL
    info = MPI.Info.Create()
    for key, value in hints.items():
        info.Set(str(key), str(value))
    return info


def open_parallel(path, mode: str, comm, hints: dict | None = None, **kwargs):
    """h5py.File with the mpio driver on comm; a file HDF5 cannot open raises DatasetError."""
    import h5py

    try:
        return h5py.File(path, mode, driver="mpio", comm=comm, info=mpi_info(hints), **kwargs)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot open as HDF5 ({exc})") from None


def write_rows(dataset, lo: int, rows: np.ndarray, total: int, comm) -> None:
    """dataset[lo : lo + len(rows)] = rows, where every rank writes its block of `total` rows:
    collective when every rank has rows, independent otherwise (a rank with an empty
    selection inside a collective write hangs the others)."""
    if total >= comm.Get_size():
        with dataset.collective:
            dataset[lo : lo + len(rows)] = rows
    elif len(rows):
        dataset[lo : lo + len(rows)] = rows


def rows_per_chunk(row_bytes: int, chunk_bytes: int, n: int) -> int:
    return max(1, min(n, chunk_bytes // max(1, row_bytes)))


class DatasetWriter:
    """Collective writer of one dataset file: create, write slabs, then `close()` renames into place."""

    def __init__(self, path, n: int, sample_shape, comm, *, sample_dtype=np.uint8, layout: str = "images",
                 classes: int | None = None, class_names=None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 contiguous: bool = False, alignment: int | None = None, provenance: dict | None = None):
        if n <= 0:
            raise DatasetError(f"{path}: a dataset needs at least one sample, got {n}")
        self.path, self.comm, self.n = Path(path), comm, n
        self.partial = self.path.with_name(self.path.name + ".partial")
        if comm.Get_rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        comm.Barrier()
        kwargs = {"alignment_threshold": alignment, "alignment_interval": alignment} if alignment else {}
        self.file = open_parallel(self.partial, "w", comm, **kwargs)
        row_bytes = int(np.prod(sample_shape)) * np.dtype(sample_dtype).itemsize
        sample_chunks = None if contiguous else (rows_per_chunk(row_bytes, chunk_bytes, n), *sample_shape)
        label_chunks = None if contiguous else (rows_per_chunk(8, chunk_bytes, n),)
        names = LAYOUTS[layout]
        self.samples = self.file.create_dataset(names[0], (n, *sample_shape), dtype=sample_dtype,
                                                chunks=sample_chunks)
        self.labels = (self.file.create_dataset(LABELS, (n,), dtype=np.int64, chunks=label_chunks)
                       if LABELS in names else None)
        if classes is not None:
            self.file.attrs["classes"] = classes
        if class_names is not None:
            self.file.attrs["class_names"] = [str(c) for c in class_names]
        for key, value in (provenance or {}).items():
            self.file.attrs[f"provenance.{key}"] = value

    def slab(self) -> tuple[int, int]:
        """This rank's share [lo, hi) of the samples (contiguous, as even as possible)."""
        return block(self.n, self.comm.Get_size(), self.comm.Get_rank())

    def write(self, lo: int, samples: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Write this rank's rows starting at lo (its `slab()`); labels only in the "images" layout."""
        write_rows(self.samples, lo, samples, self.n, self.comm)
        if self.labels is not None:
            write_rows(self.labels, lo, labels, self.n, self.comm)

    def close(self) -> Path:
        """Close collectively, then rank 0 renames the complete file into place."""
        self.file.close()
        self.comm.Barrier()
        if self.comm.Get_rank() == 0:
            os.replace(self.partial, self.path)
        self.comm.Barrier()
        return self.path

    def abort(self) -> None:
        """Close and remove the partial file (after an error on every rank)."""
        self.file.close()
        self.comm.Barrier()
        if self.comm.Get_rank() == 0:
            self.partial.unlink(missing_ok=True)


def write_arrays(path, samples: np.ndarray, labels: np.ndarray | None, comm, **layout) -> Path:
    """Write in-memory arrays (the same on every rank) as a dataset file, each rank its slab:
    images and their labels, or (labels None) token windows."""
    if labels is not None and len(samples) != len(labels):
        raise DatasetError(f"{path}: {len(samples)} images but {len(labels)} labels")
    writer = DatasetWriter(path, len(samples), samples.shape[1:], comm, sample_dtype=samples.dtype,
                           layout="images" if labels is not None else "tokens", **layout)
    lo, hi = writer.slab()
    try:
        writer.write(lo, samples[lo:hi], None if labels is None else labels[lo:hi])
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def layout_of(file) -> str:
    return "tokens" if TOKENS in file and IMAGES not in file else "images"


def validate(file, path) -> dict:
    """Check the layout; return {'layout', 'n', 'sample_shape', 'sample_dtype', 'classes'}. Raises DatasetError."""
    if layout_of(file) == "tokens":
        return validate_tokens(file, path)
    images, labels = (_dataset(file, name, path) for name in (IMAGES, LABELS))
    if labels.ndim != 1:
        raise DatasetError(f"{path}: dataset 'labels' must be 1-D, has shape {labels.shape}")
    if images.ndim < 2:
        raise DatasetError(f"{path}: dataset 'images' must be (N, ...), has shape {images.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{path}: dataset 'images' has {images.shape[0]} samples but 'labels' has "
                           f"{labels.shape[0]}")
    if labels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: dataset 'labels' must hold integers, has dtype {labels.dtype}")
    if images.dtype.kind not in "uif":
        raise DatasetError(f"{path}: dataset 'images' must be numeric, has dtype {images.dtype}")
    if images.shape[0] == 0:
        raise DatasetError(f"{path}: dataset 'images' is empty")
    return {"layout": "images", "n": images.shape[0], "sample_shape": images.shape[1:],
            "sample_dtype": images.dtype, "classes": classes_attribute(file, path)}


def _dataset(file, name: str, path):
    """file[name], once it is there and is a dataset (not a group, not a link to nowhere)."""
    import h5py

    if name not in file:
        raise DatasetError(f"{path}: dataset '{name}' is missing (found: {sorted(file)})")
    found = file.get(name, getclass=True)
    if found is not h5py.Dataset:
        raise DatasetError(f"{path}: '{name}' must be a dataset, is a {getattr(found, '__name__', found)}")
    return file[name]


def validate_tokens(file, path) -> dict:
    tokens = _dataset(file, TOKENS, path)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise DatasetError(f"{path}: dataset 'tokens' must be (N, T + 1) windows with T >= 1, has shape "
                           f"{tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise DatasetError(f"{path}: dataset 'tokens' must hold integers, has dtype {tokens.dtype}")
    if tokens.shape[0] == 0:
        raise DatasetError(f"{path}: dataset 'tokens' is empty")
    classes = classes_attribute(file, path)
    if classes is None:
        raise DatasetError(f"{path}: attribute 'classes' (the vocabulary size of dataset 'tokens') is missing")
    return {"layout": "tokens", "n": tokens.shape[0], "sample_shape": tokens.shape[1:],
            "sample_dtype": tokens.dtype, "classes": classes}


MAX_CLASSES = 1 << 24  # an output layer wider than this comes from a corrupt file, not from a data set


def classes_attribute(file, path) -> int | None:
    """The file's 'classes' attribute (None if absent), once it is a whole number in [1, MAX_CLASSES]."""
    if "classes" not in file.attrs:
        return None
    value = np.asarray(file.attrs["classes"])
    if value.shape != () or value.dtype.kind not in "iu" or not 1 <= int(value) <= MAX_CLASSES:
        raise DatasetError(f"{path}: attribute 'classes' must be a whole number in [1, {MAX_CLASSES}], "
                           f"got {str(value)[:80]!r} ({value.dtype})")
    return int(value)


def check_labels(labels: np.ndarray, classes: int | None, path) -> None:
    if classes is None and len(labels) and labels.max() >= MAX_CLASSES:
        raise DatasetError(f"{path}: dataset 'labels' holds {int(labels.max())} and there is no 'classes' "
                           f"attribute: a model that wide ({MAX_CLASSES} outputs at most) is not what it asks for")
    if len(labels) and (labels.min() < 0 or (classes is not None and labels.max() >= classes)):
        bad = int(np.flatnonzero((labels < 0) | ((labels >= classes) if classes else False))[0])
        raise DatasetError(f"{path}: dataset 'labels' value {int(labels[bad])} at index {bad} is outside "
                           f"[0, {classes})")


def check_tokens(rows: np.ndarray, indices: np.ndarray, classes: int, path) -> None:
    """Every token of the windows `indices` (rows) inside the vocabulary [0, classes): windows are
    checked as they are read, since a set of tokens is too big to read twice."""
    if rows.size and (rows.min() < 0 or rows.max() >= classes):
        row, position = np.argwhere((rows < 0) | (rows >= classes))[0]
        raise DatasetError(f"{path}: dataset 'tokens' window {int(indices[row])} holds {int(rows[row, position])} "
                           f"at position {int(position)}, outside the vocabulary [0, {classes})")


def checksum(file) -> str:
    """sha256 over the layout's datasets in order, read in chunk-sized pieces (serial reads)."""
    digest = hashlib.sha256()
    for name in LAYOUTS[layout_of(file)]:
        dset = file[name]
        step = dset.chunks[0] if dset.chunks else max(1, (1 << 20) // max(1, dset.dtype.itemsize
                                                                           * int(np.prod(dset.shape[1:]))))
        for lo in range(0, dset.shape[0], step):
            digest.update(np.ascontiguousarray(dset[lo : lo + step]).tobytes())
    return digest.hexdigest()


def describe(path) -> dict:
    """Layout, chunking, sizes and checksum of a dataset file (serial; for `hpc-train data inspect`)."""
    import h5py

    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open as HDF5 ({exc})") from None
    with file:
        meta = validate(file, path)
        out = {"file": str(path), "bytes": os.path.getsize(path), "samples": meta["n"],
               "attributes": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in file.attrs.items()}}
        for name in LAYOUTS[meta["layout"]]:
            dset = file[name]
            offset = dset.id.get_offset()
            out[name] = {"shape": list(dset.shape), "dtype": str(dset.dtype),
                         "layout": "chunked" if dset.chunks else "contiguous",
                         "chunks": list(dset.chunks) if dset.chunks else None,
                         "offset": offset, "storage_bytes": dset.id.get_storage_size()}
        out["sha256"] = checksum(file)
    return out

"""Parallel HDF5 loader: every rank reads its batches with MPI-IO, one batch ahead.

Per batch the indices are sorted and coalesced into contiguous runs, selected as
a union of hyperslabs and read in ONE H5Dread (collective by default) straight
into a preallocated buffer of the on-disk dtype (no type conversion: that would
silently turn a collective read independent), then permuted back into sampler
order in memory. The read goes through h5py's low-level API, so a rank with
nothing to read still calls H5Dread with an empty selection (h5py's high-level
indexing skips it, and the collective hangs: h5py #965). One prefetch thread reads
the next batches while the caller computes.

A file of the "tokens" layout (io/hdf5.py) yields (inputs, targets): each window's
first T tokens and its last T, integers as stored (no transform unless asked).
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref

import numpy as np

from ..comm.check import raise_if_any
from ..io.hdf5 import LABELS, LAYOUTS, DatasetError, check_labels, check_tokens, open_parallel, validate
from .loader import to_float
from .sampler import DistributedSampler

log = logging.getLogger("hpc_train")


def runs(sorted_indices: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous (start, count) runs of sorted, distinct indices."""
    if len(sorted_indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(sorted_indices)]])
    return [(int(sorted_indices[a]), int(b - a)) for a, b in zip(starts, stops, strict=True)]


class HDF5Loader:
    """Iterate (images, labels) batches of this rank's share, or (inputs, targets) of a token set;
    each pass is the next epoch.

    Opening is collective over `comm` (default: a duplicate of the world, so that the
    prefetch thread's MPI-IO never mixes with the caller's collectives). Bad files
    raise DatasetError on every rank. `output(images, labels)`, if given, turns each batch
    into what the loop wants, on the prefetch thread (e.g. `hpc_train.torch.tensor_batches()`:
    torch tensors, without a copy on the CPU); otherwise `device` says where arrays land.
    `transform` (default: images to float in [-1, 1], tokens untouched) applies to the inputs.
    """

    def __init__(self, path, batch_size: int, sampler: DistributedSampler | None = None, *,
                 collective: bool = True, prefetch: int = 2, hints: dict | None = None, transform=None,
                 comm=None, shuffle: bool = True, seed: int = 0, drop_last: bool = False, device: str = "cpu",
                 output=None):
        from h5py import h5fd, h5p

        from .. import runtime

        self.comm = comm if comm is not None else runtime.world().Dup()
        if device not in ("cpu", "cuda"):
            raise ValueError(f"HDF5Loader device {device!r}: expected 'cpu' or 'cuda'")
        self.path, self.batch_size, self.device = str(path), batch_size, device
        self.output = output
        self.prefetch = max(1, prefetch)
        self.file = open_parallel(path, "r", self.comm, hints)
        # A loader dropped without close() (rebound to a new one) closes its file when collected:
        # h5py's own deallocation of an MPI-IO file with datasets still open raises, and the
        # abort hook would end the job. Closing is collective; dropping happens at the same point
        # of the program on every rank.
        self._release = weakref.finalize(self, release, self.file, self.comm if comm is None else None)
        try:
            meta = self._agree(lambda: validate(self.file, path))
            self.layout = meta["layout"]
            self.samples = self.file[LAYOUTS[self.layout][0]]
            self.labels = self._read_all_labels(meta["classes"]) if self.layout == "images" else None
        except BaseException:
            self._release()
            raise
        self.n, self.sample_shape, self.sample_dtype = meta["n"], meta["sample_shape"], meta["sample_dtype"]
        tokens = self.layout == "tokens"
        # what the model is given a sample: an image, or a window less its last token
        self.input_shape = (self.sample_shape[0] - 1,) if tokens else self.sample_shape
        # output width the data needs: the vocabulary or the file's 'classes', else the largest label + 1
        self.classes = meta["classes"] or int(self.labels.max()) + 1
        if meta["classes"] is None and self.comm.Get_rank() == 0:
            log.warning("%s: no 'classes' attribute: the model's output width is the largest label + 1 = %d",
                        path, self.classes)
        self.transform = transform or ((lambda inputs: inputs) if tokens else to_float)
        self.sampler = sampler or DistributedSampler(self.n, self.comm.Get_rank(), self.comm.Get_size(),
                                                     shuffle=shuffle, seed=seed, drop_last=drop_last)
        if self.sampler.n != self.n:
            self.close()
            raise DatasetError(f"{path}: sampler covers {self.sampler.n} samples, file has {self.n}")
        self._xfer = h5p.create(h5p.DATASET_XFER)
        self._xfer.set_dxpl_mpio(h5fd.MPIO_COLLECTIVE if collective else h5fd.MPIO_INDEPENDENT)
        self._buffer = None  # allocated at the first read: a caller can check the batch's size first
        self._passes, self._epoch_set = 0, False
        self.max_batches: int | None = None  # batches per pass, if fewer than a whole epoch

    def _agree(self, check):
        """Run check() on every rank; if any rank fails, every rank raises the first failure
        (a file the library itself cannot make sense of included, named as such)."""
        try:
            result, problem = check(), None
        except DatasetError as exc:
            result, problem = None, str(exc)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, MemoryError, RecursionError,
                RuntimeError) as exc:  # RuntimeError: h5py's for some damaged metadata
            result, problem = None, f"{self.path}: unreadable data set ({exc!r})"
        raise_if_any(self.comm, problem, DatasetError)
        return result

    def _read_all_labels(self, classes):
        """Labels are small: every rank keeps all of them (one collective read)."""
        from h5py import h5fd, h5p

        dset = self.file[LABELS]
        labels = np.empty(dset.shape, np.int64)
        xfer = h5p.create(h5p.DATASET_XFER)
        xfer.set_dxpl_mpio(h5fd.MPIO_COLLECTIVE)
        dset.id.read(dset.id.get_space(), dset.id.get_space(), labels, dxpl=xfer)
        self._agree(lambda: check_labels(labels, classes, self.path))
        return labels

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._epoch_set = True

    def __len__(self) -> int:
        whole = -(-len(self.sampler) // self.batch_size)
        return whole if self.max_batches is None else min(whole, self.max_batches)

    def read(self, indices: np.ndarray):
        """(images, labels) or (inputs, targets) for these indices, in their order (one H5Dread;
        collective if set up so)."""
        from h5py import h5s

        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        unique, first = np.unique(ordered, return_index=True)
        rows = len(unique)
        if self._buffer is None:
            self._buffer = np.empty((self.batch_size, *self.sample_shape), self.sample_dtype)
        buf = self._buffer[:rows] if rows <= len(self._buffer) else np.empty((rows, *self.sample_shape),
                                                                                 self.sample_dtype)
        file_space = self.samples.id.get_space()
        file_space.select_none()
        tail = tuple(self.sample_shape)
        for start, count in runs(unique):
            file_space.select_hyperslab((start, *(0,) * len(tail)), (count, *tail), op=h5s.SELECT_OR)
        memory_space = h5s.create_simple((max(rows, 1), *tail))
        if rows == 0:
            memory_space.select_none()
        try:
            self.samples.id.read(memory_space, file_space, buf if rows else self._buffer[:1], dxpl=self._xfer)
        except (OSError, ValueError) as exc:  # a damaged chunk: named, then the abort hook ends the job
            raise DatasetError(f"{self.path}: rank {self.comm.Get_rank()}: reading {rows} samples of dataset "
                               f"'{self.samples.name.lstrip('/')}' (indices {unique[:4].tolist()}...) "
                               f"failed ({exc})") from None
        # duplicates (padding) read once, then every requested position filled in sampler order
        position_in_unique = np.repeat(np.arange(rows), np.diff(np.concatenate([first, [len(ordered)]])))
        samples = np.empty((len(indices), *tail), self.sample_dtype)
        samples[order] = buf[position_in_unique]
        if self.labels is not None:
            return samples, self.labels[indices]
        check_tokens(samples, indices, self.classes, self.path)
        return samples[:, :-1], samples[:, 1:]

    def __iter__(self):
        if self._passes and not self._epoch_set:
            self.sampler.set_epoch(self.sampler.epoch + 1)
        self._passes += 1
        self._epoch_set = False
        indices = self.sampler.indices()
        batches = [indices[lo : lo + self.batch_size]
                   for lo in range(0, len(self) * self.batch_size, self.batch_size)]
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def offer(item) -> None:
            """Hand item to the consumer, unless it has stopped listening."""
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce():
            # Every planned batch is read even if the consumer stops early: the reads are
            # collective, and a rank that skipped one would leave the others waiting in it.
            try:
                to_device = self.output or self._device_copier()
                for ix in batches:
                    inputs, targets = self.read(ix)
                    offer(to_device(self.transform(inputs), targets))
                offer(None)
            except BaseException as exc:  # handed to the consumer
                offer(exc)

        thread = threading.Thread(target=produce, name="hpc_train-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()  # after the remaining planned reads

    def _device_copier(self):
        """Identity on the CPU; with device='cuda', a host-to-device copy on the prefetch thread's
        own non-blocking stream, finished before the batch is handed over (not run on a GPU here)."""
        if self.device == "cpu":
            return lambda images, labels: (images, labels)
        from ..backend import cupy_module

        cupy = cupy_module()
        if cupy is None:
            raise RuntimeError("HDF5Loader(device='cuda') needs cupy (pip install 'hpc_train[gpu]')")
        stream = cupy.cuda.Stream(non_blocking=True)

        def copy(images, labels):
            with stream:
                out = cupy.asarray(images), cupy.asarray(labels)
            stream.synchronize()
            return out

        return copy

    def close(self) -> None:
        """Close the file (collective over the loader's communicator)."""
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def release(file, own_comm) -> None:
    """Close the file (h5py closes the datasets still open in it first), then free the communicator
    the loader duplicated for itself."""
    if file.id.valid:
        file.close()
    if own_comm is not None:
        own_comm.Free()

"""I/O engines of `hpc-train iobench`: how one job instance reads and writes its file.

psync: os.preadv / os.pwritev on a file descriptor (O_DIRECT when direct=1), as
fio's psync. mpiio: MPI.File read_at / write_at, or the collective read_at_all /
write_at_all with collective=1. hdf5: h5py on the mpio driver, one 1-D byte
dataset `data`, hyperslab reads and writes, independent or collective, contiguous
or chunked (hdf5_chunk=). Every engine moves whole blocks through a buffer the
runner owns.
"""

from __future__ import annotations

import os

import numpy as np

DATASET = "data"


def drop_cache(path) -> None:
    """fio's invalidate=1: drop the file's pages from the page cache (posix_fadvise DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class PsyncEngine:
    def __init__(self, path, options: dict, writable: bool, comm=None):
        flags = (os.O_RDWR if writable else os.O_RDONLY) | (os.O_DIRECT if options["direct"] else 0)
        if options["invalidate"]:
            drop_cache(path)
        self.fd = os.open(path, flags)

    def read(self, view, offset: int) -> int:
        return os.preadv(self.fd, [view], offset)

    def write(self, view, offset: int) -> int:
        return os.pwritev(self.fd, [view], offset)

    def sync(self, data_only: bool = False) -> None:
        (os.fdatasync if data_only else os.fsync)(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class MPIIOEngine:
    def __init__(self, path, options: dict, writable: bool, comm):
        from mpi4py import MPI

        if options["invalidate"]:
            drop_cache(path)
        self.byte = MPI.BYTE
        self.fh = MPI.File.Open(comm, str(path), MPI.MODE_RDWR if writable else MPI.MODE_RDONLY)
        collective = options["collective"]
        self._read = self.fh.Read_at_all if collective else self.fh.Read_at
        self._write = self.fh.Write_at_all if collective else self.fh.Write_at

    def read(self, view, offset: int) -> int:
        self._read(offset, [view, self.byte])
        return len(view)

    def write(self, view, offset: int) -> int:
        self._write(offset, [view, self.byte])
        return len(view)

    def sync(self, data_only: bool = False) -> None:  # MPI has one sync
        self.fh.Sync()

    def close(self) -> None:
        self.fh.Close()


class HDF5Engine:
    def __init__(self, path, options: dict, writable: bool, comm):
        from h5py import h5fd, h5p

        from .hdf5 import open_parallel

        if options["invalidate"]:
            drop_cache(path)
        self.file = open_parallel(path, "r+" if writable else "r", comm)
        self.dset = self.file[DATASET].id
        self.xfer = h5p.create(h5p.DATASET_XFER)
        self.xfer.set_dxpl_mpio(h5fd.MPIO_COLLECTIVE if options["collective"] else h5fd.MPIO_INDEPENDENT)

    def _spaces(self, offset: int, n: int):
        from h5py import h5s

        file_space = self.dset.get_space()
        file_space.select_hyperslab((offset,), (n,))
        return h5s.create_simple((n,)), file_space

    def read(self, view, offset: int) -> int:
        memory_space, file_space = self._spaces(offset, len(view))
        self.dset.read(memory_space, file_space, np.frombuffer(view, np.uint8), dxpl=self.xfer)
        return len(view)

    def write(self, view, offset: int) -> int:
        memory_space, file_space = self._spaces(offset, len(view))
        self.dset.write(memory_space, file_space, np.frombuffer(view, np.uint8), dxpl=self.xfer)
        return len(view)

    def sync(self, data_only: bool = False) -> None:  # HDF5 has one flush
        self.file.flush()

    def close(self) -> None:
        self.file.close()


ENGINES = {"psync": PsyncEngine, "mpiio": MPIIOEngine, "hdf5": HDF5Engine}


def create_hdf5_file(path, nbytes: int, chunk: int) -> None:
    """An HDF5 file holding one byte dataset of nbytes, filled (serial h5py; layout before a run)."""
    import h5py

    with h5py.File(path, "w") as f:
        dset = f.create_dataset(DATASET, (nbytes,), dtype=np.uint8, chunks=(min(chunk, nbytes),) if chunk else None)
        step = 1 << 20
        block = np.random.default_rng(0).integers(0, 256, step, dtype=np.uint8)
        for lo in range(0, nbytes, step):
            dset[lo : min(nbytes, lo + step)] = block[: min(nbytes, lo + step) - lo]

"""I/O engines of `hpc-train iobench`: how one job instance reads and writes its file.

psync, pvsync: os.preadv / os.pwritev at the I/O's offset on a file descriptor (O_DIRECT
when direct=1); sync: os.lseek then os.readv / os.writev at the file position, as fio's
sync. null: no I/O at all (the engine and runner's own cost, as fio's null). libaio,
io_uring, posixaio: the job's I/Os at its queue depth (`iodepth`), in C (io/aio.c, built on
first use). mpiio: MPI.File read_at / write_at, or the collective read_at_all / write_at_all with
collective=1. hdf5: h5py on the mpio driver, one 1-D byte dataset `data`, hyperslab reads
and writes, independent or collective, contiguous or chunked (hdf5_chunk=).

Every engine opens a job copy's files (`paths`: several with nrfiles=; mpiio and hdf5 take one)
and runs a list of I/Os with `run(offsets, reads, sizes, files, view, stride, deadline_ns)`, each
I/O on the file `files` names by its place in `paths`, returning their stamps (`Stamps`); `view`
is one block that every I/O uses (its first `size` bytes), or a block per I/O every `stride`
bytes (what verify= writes and checks); the synchronous engines do it one I/O at a time through
their `read`/`write`. `ENGINES` is the registry: a name, and what the runner and the job-file
checks need to know of each (`on_fd`: POSIX file descriptors, so direct=1 applies, a job copy
may have several files and instances run as threads; `queued`: iodepth applies; `needs_file`:
the job's files are laid out, checked and unlinked).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

DATASET = "data"


@dataclass
class Stamps:
    """What a run of I/Os did, one entry per I/O issued (CLOCK_MONOTONIC ns): set up, issued
    (the submit call returned: slat = issued - set_up), reaped (clat = reaped - issued), and the
    bytes or -errno each returned; with the I/Os in flight at each one's commit and how many I/Os
    each submit and each reap call carried (fio's iodepth tables)."""

    set_up: np.ndarray
    issued: np.ndarray
    reaped: np.ndarray
    result: np.ndarray
    depth: np.ndarray
    submit_calls: np.ndarray
    complete_calls: np.ndarray


class SyncEngine:
    """One I/O at a time: fio's psync family; `slat` is not measured (no submission step)."""

    on_fd = False
    queued = False
    needs_file = True

    def run(self, offsets: np.ndarray, reads: np.ndarray, sizes: np.ndarray, files: np.ndarray, view, stride: int,
            deadline_ns: int) -> Stamps:
        n = len(offsets)
        set_up, reaped, result = (np.zeros(n, np.int64) for _ in range(3))
        per_io = len(view) >= n * stride
        done = 0
        for offset, reading, size, file in zip(offsets.tolist(), reads.tolist(), sizes.tolist(), files.tolist(),
                                               strict=True):
            t0 = time.perf_counter_ns()  # CLOCK_MONOTONIC, as the C engines' stamps
            if deadline_ns and t0 >= deadline_ns:
                break
            block = view[done * stride : done * stride + size] if per_io else view[:size]
            result[done] = self.read(block, offset, file) if reading else self.write(block, offset, file)
            set_up[done], reaped[done] = t0, time.perf_counter_ns()
            done += 1
        ones = np.ones(done, np.int64)
        return Stamps(set_up[:done], set_up[:done], reaped[:done], result[:done], ones, ones, ones)


def drop_cache(path) -> None:
    """fio's invalidate=1: drop the file's pages from the page cache (posix_fadvise DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def open_files(paths, options: dict, writable: bool) -> list[int]:
    """A descriptor per file (O_DIRECT with direct=1; the page cache dropped first with
    invalidate=1); none left open if one fails."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | (os.O_DIRECT if options["direct"] else 0)
    fds: list[int] = []
    try:
        for path in paths:
            if options["invalidate"]:
                drop_cache(path)
            fds.append(os.open(path, flags))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds


class PsyncEngine(SyncEngine):
    on_fd = True

    def __init__(self, paths, options: dict, writable: bool, comm=None):
        self.fds = open_files(paths, options, writable)

    def read(self, view, offset: int, file: int) -> int:
        return os.preadv(self.fds[file], [view], offset)

    def write(self, view, offset: int, file: int) -> int:
        return os.pwritev(self.fds[file], [view], offset)

    def sync(self, data_only: bool = False) -> None:
        for fd in self.fds:
            (os.fdatasync if data_only else os.fsync)(fd)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


class SyncEngineAtPosition(PsyncEngine):
    """fio's sync: the offset set with lseek, then read / write at the file position."""

    def read(self, view, offset: int, file: int) -> int:
        os.lseek(self.fds[file], offset, os.SEEK_SET)
        return os.readv(self.fds[file], [view])

    def write(self, view, offset: int, file: int) -> int:
        os.lseek(self.fds[file], offset, os.SEEK_SET)
        return os.writev(self.fds[file], [view])


class NullEngine(SyncEngine):
    """fio's null: every I/O completes at once without touching a file; runs as a thread as the
    descriptor engines do (direct= has nothing to change)."""

    on_fd = True
    needs_file = False

    def __init__(self, paths, options: dict, writable: bool, comm=None):
        pass

    def read(self, view, offset: int, file: int) -> int:
        return len(view)

    write = read

    def sync(self, data_only: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


class QueuedEngine:
    """libaio, io_uring or posixaio (io/aio.c): I/Os staged, committed every iodepth_batch_submit and reaped
    as fio does, up to iodepth in flight; no Python between two I/Os (the GIL is released)."""

    on_fd = True
    queued = True
    needs_file = True
    kind = ""

    def __init__(self, paths, options: dict, writable: bool, comm=None):
        from .. import native

        self.module = native.load("hpc_train.io", "aio.c", "_aio")
        if self.module is None:
            raise EngineUnavailable(f"ioengine={self.kind} needs its C module, which could not be built here "
                                    "(see the warning above); use ioengine=psync")
        self.options = options
        self.descriptors = PsyncEngine(paths, options, writable)  # the files, opened as psync opens them
        self.fds = np.asarray(self.descriptors.fds, np.int32)
        try:  # the kernel context once per job copy: tearing one down costs milliseconds
            self.queue = self.module.open(self.kind, options["iodepth"], options["bs_max"])
        except OSError as exc:
            self.descriptors.close()
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: OSError) -> EngineUnavailable:
        return EngineUnavailable(f"ioengine={self.kind}: {exc.strerror or exc}, setting up or submitting to the "
                                 "kernel's interface (kernel.io_uring_disabled can turn io_uring off; libaio or "
                                 "psync may serve)")

    def run(self, offsets: np.ndarray, reads: np.ndarray, sizes: np.ndarray, files: np.ndarray, view, stride: int,
            deadline_ns: int) -> Stamps:
        o, n = self.options, len(offsets)
        out = [np.zeros(n, np.int64) for _ in range(7)]
        try:  # the queue's slots are `stride` (bs_max) bytes: the stride of a per-I/O buffer too
            issued, submits, reaps = self.module.run(
                self.queue, self.fds[files], np.ascontiguousarray(offsets, np.int64),
                np.ascontiguousarray(reads, np.uint8), np.ascontiguousarray(sizes, np.int64), view,
                o["iodepth_batch_submit"], o["iodepth_batch_complete_min"], o["iodepth_batch_complete_max"],
                o["iodepth_low"], deadline_ns, *out)
        except OSError as exc:
            raise self._unavailable(exc) from None
        set_up, stamped, reaped, result, submit_calls, complete_calls, depth = out
        return Stamps(set_up[:issued], stamped[:issued], reaped[:issued], result[:issued], depth[:issued],
                      submit_calls[:submits], complete_calls[:reaps])

    def sync(self, data_only: bool = False) -> None:
        self.descriptors.sync(data_only)

    def close(self) -> None:
        self.module.close(self.queue)
        self.descriptors.close()


class LibaioEngine(QueuedEngine):
    kind = "libaio"


class IOUringEngine(QueuedEngine):
    kind = "io_uring"


class PosixAIOEngine(QueuedEngine):
    kind = "posixaio"


class EngineUnavailable(OSError):
    """An engine that cannot run here (its C module, or the kernel's interface), with what to use."""


class MPIIOEngine(SyncEngine):
    """One file (paths[0]), opened on the job's communicator."""

    def __init__(self, paths, options: dict, writable: bool, comm):
        from mpi4py import MPI

        path = paths[0]
        if options["invalidate"]:
            drop_cache(path)
        self.byte = MPI.BYTE
        self.fh = MPI.File.Open(comm, str(path), MPI.MODE_RDWR if writable else MPI.MODE_RDONLY)
        collective = options["collective"]
        self._read = self.fh.Read_at_all if collective else self.fh.Read_at
        self._write = self.fh.Write_at_all if collective else self.fh.Write_at

    def read(self, view, offset: int, file: int) -> int:
        self._read(offset, [view, self.byte])
        return len(view)

    def write(self, view, offset: int, file: int) -> int:
        self._write(offset, [view, self.byte])
        return len(view)

    def sync(self, data_only: bool = False) -> None:  # MPI has one sync
        self.fh.Sync()

    def close(self) -> None:
        self.fh.Close()


class HDF5Engine(SyncEngine):
    """One file (paths[0]) of one byte dataset, opened on the job's communicator."""

    def __init__(self, paths, options: dict, writable: bool, comm):
        from h5py import h5fd, h5p

        from .hdf5 import open_parallel

        path = paths[0]
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

    def read(self, view, offset: int, file: int) -> int:
        memory_space, file_space = self._spaces(offset, len(view))
        self.dset.read(memory_space, file_space, np.frombuffer(view, np.uint8), dxpl=self.xfer)
        return len(view)

    def write(self, view, offset: int, file: int) -> int:
        memory_space, file_space = self._spaces(offset, len(view))
        self.dset.write(memory_space, file_space, np.frombuffer(view, np.uint8), dxpl=self.xfer)
        return len(view)

    def sync(self, data_only: bool = False) -> None:  # HDF5 has one flush
        self.file.flush()

    def close(self) -> None:
        self.file.close()


ENGINES = {"psync": PsyncEngine, "pvsync": PsyncEngine, "sync": SyncEngineAtPosition, "null": NullEngine,
           "libaio": LibaioEngine, "io_uring": IOUringEngine, "posixaio": PosixAIOEngine, "mpiio": MPIIOEngine,
           "hdf5": HDF5Engine}


def create_hdf5_file(path, nbytes: int, chunk: int) -> None:
    """An HDF5 file holding one byte dataset of nbytes, filled (serial h5py; layout before a run)."""
    import h5py

    with h5py.File(path, "w") as f:
        dset = f.create_dataset(DATASET, (nbytes,), dtype=np.uint8, chunks=(min(chunk, nbytes),) if chunk else None)
        step = 1 << 20
        block = np.random.default_rng(0).integers(0, 256, step, dtype=np.uint8)
        for lo in range(0, nbytes, step):
            dset[lo : min(nbytes, lo + step)] = block[: min(nbytes, lo + step) - lo]

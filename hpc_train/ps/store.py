"""The parameter store: a flat parameter vector sharded over ranks in MPI windows.

Every server rank hosts a contiguous slice (`partition` over the servers: all ranks,
or the first `servers` ones). Workers read and update it with one-sided operations
that need nothing from the owner (Li et al. OSDI'14's push/pull, on MPI's RDMA-style
calls): `pull` is MPI_Get_accumulate with NO_OP (an element-wise atomic read),
`push` is MPI_Accumulate with SUM (element-wise atomic: no update is ever lost).
All of it runs in one shared passive-target epoch (Lock_all) opened at start, with
a flush after each operation, so no rank ever holds an exclusive lock that a dead
peer could leave behind.

A second window on rank 0 holds one clock per worker (completed steps) and a global
update counter (pushes so far): what SSP waits on and what staleness is measured by. A worker
that stops early (preemption) sets its clock to STOPPED + the signal's number: nobody waits
for it any more, and the others read from the clocks that they should stop too.

Across nodes without RDMA hardware (osc/ucx over TCP), and under MPICH on one node too, a
one-sided operation is served only while the target rank is inside MPI; a rank busy
computing, or spinning on local memory, would starve everyone else's pulls and pushes (an
SSP job hung that way on the network-namespace rig). There a progress thread enters MPI
every 200 us.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..comm import partition

STOPPED = 1 << 62  # a stopped worker's clock: STOPPED + signal number, above any real clock


CACHE_LINE = 64


def _whole_cache_lines(nbytes: int) -> int:
    """`nbytes` rounded up to whole cache lines. MPICH 4.0.2 (ch4, one node) places the ranks'
    windows back to back in one shared segment, and concurrent Accumulates into two windows that
    share a cache line corrupted the elements at the seam (1001 floats over 2 or 3 ranks); Open
    MPI was exact. A window of whole cache lines shares none."""
    return -(-nbytes // CACHE_LINE) * CACHE_LINE


class ParameterStore:
    def __init__(self, initial: np.ndarray, comm, servers: int = 0):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm
        p, rank = comm.Get_size(), comm.Get_rank()
        if not 0 <= servers <= p:
            raise ValueError(f"ps.servers = {servers}: expected 0 (every rank) to {p} (the ranks of this job)")
        self.servers = list(range(servers or p))
        self.size = initial.size
        self.dtype = initial.dtype
        self.counts, self.offsets = partition(initial.size, len(self.servers))
        mine = self.counts[rank] if rank in self.servers else 0
        item = initial.dtype.itemsize
        self.win = MPI.Win.Allocate(_whole_cache_lines(mine * item), item, comm=comm)
        self.local = np.frombuffer(self.win.tomemory(), initial.dtype, count=mine)
        if mine:
            start = self.offsets[rank]
            self.local[...] = initial.reshape(-1)[start : start + mine]
        self.clock_win = MPI.Win.Allocate((p + 1) * 8 if rank == 0 else 0, 8, comm=comm)
        if rank == 0:
            np.frombuffer(self.clock_win.tomemory(), np.int64, count=p + 1)[...] = 0
        # Predefined MPI types only: osc/ucx (Open MPI 4.1, across nodes) applied an Accumulate of a
        # derived datatype (mpi4py's from_numpy_dtype returns a Dup of MPI_FLOAT) to the first element only.
        predefined = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}
        if initial.dtype not in predefined:
            raise TypeError(f"parameter store: dtype {initial.dtype} unsupported (float32 or float64)")
        self._mpi_dtype = predefined[initial.dtype]
        self._ignored = [np.zeros(1, initial.dtype), 0, self._mpi_dtype]  # NO_OP reads no origin data
        comm.Barrier()
        self.win.Lock_all()
        self.clock_win.Lock_all()
        self._open = True
        self._progress = None
        if self._targets_need_progress():
            self._progress = threading.Thread(target=self._drive_progress, name="hpc_train-ps-progress", daemon=True)
            self._progress.start()

    def _targets_need_progress(self) -> bool:
        """Across nodes, and under MPICH even on one node (ch4 serves a passive-target Accumulate
        only when the target is inside MPI), a computing rank starves the others' pushes and pulls."""
        from .. import runtime

        spans_nodes = runtime.topology().num_nodes > 1 and not runtime.topology().pretended
        return spans_nodes or not self._mpi.Get_library_version().startswith("Open MPI")

    def _drive_progress(self) -> None:
        while self._open:
            self.comm.Iprobe()  # opal_progress: serves the one-sided requests aimed at this rank
            time.sleep(0.0002)

    def _slices(self):
        for q, count, offset in zip(self.servers, self.counts, self.offsets, strict=True):
            if count:
                yield q, slice(offset, offset + count)

    def pull(self, out: np.ndarray) -> np.ndarray:
        """out = the stored parameters (each element read atomically; elements may be from
        different pushes, as in Hogwild)."""
        flat = out.reshape(-1)
        for q, part in self._slices():
            target = (0, part.stop - part.start, self._mpi_dtype)  # not the origin's: NO_OP sends none
            self.win.Get_accumulate(self._ignored, [flat[part], self._mpi_dtype], q, target, op=self._mpi.NO_OP)
        self.win.Flush_all()
        return out

    def push(self, delta: np.ndarray) -> None:
        """stored += delta, element-wise atomically."""
        flat = np.ascontiguousarray(delta, self.dtype).reshape(-1)
        for q, part in self._slices():
            target = (0, part.stop - part.start, self._mpi_dtype)
            self.win.Accumulate([flat[part], self._mpi_dtype], q, target, op=self._mpi.SUM)
        self.win.Flush_all()

    # -- clocks and the update counter (rank 0's window) --------------------------------------

    def _fetch(self, index: int, value: int, op) -> int:
        old = np.zeros(1, np.int64)
        self.clock_win.Fetch_and_op(np.array([value], np.int64), old, 0, index, op=op)
        self.clock_win.Flush(0)
        return int(old[0])

    def tick(self) -> int:
        """This worker finished a step; returns its new clock."""
        return self._fetch(self.comm.Get_rank(), 1, self._mpi.SUM) + 1

    def clocks(self) -> np.ndarray:
        """Every worker's clock (completed steps), read atomically."""
        p = self.comm.Get_size()
        out = np.zeros(p, np.int64)
        self.clock_win.Get_accumulate([np.zeros(1, np.int64), 0, self._mpi.INT64_T], [out, self._mpi.INT64_T], 0,
                                      target=(0, p, self._mpi.INT64_T), op=self._mpi.NO_OP)
        self.clock_win.Flush(0)
        return out

    def stop(self, signum: int) -> None:
        """This worker stops for signal `signum`: no worker waits for its clock any more."""
        self._fetch(self.comm.Get_rank(), STOPPED + signum, self._mpi.REPLACE)

    def stop_signal(self) -> int:
        """The signal some worker stopped for (the largest), 0 while none has."""
        latest = int(self.clocks().max())
        return latest - STOPPED if latest >= STOPPED else 0

    def updates(self) -> int:
        """Pushes applied so far by all workers."""
        return self._fetch(self.comm.Get_size(), 0, self._mpi.NO_OP)

    def count_update(self) -> int:
        """Count one push; returns how many came before it."""
        return self._fetch(self.comm.Get_size(), 1, self._mpi.SUM)

    def close(self) -> None:
        """End the epoch and free the windows (collective: after every worker's last push)."""
        if self._open:
            self.comm.Barrier()
            self._open = False
            if self._progress is not None:
                self._progress.join()
            self.win.Unlock_all()
            self.clock_win.Unlock_all()
            self.win.Free()
            self.clock_win.Free()

"""The background engine: one thread that runs queued collectives in submission order.

Every rank submits the same collectives in the same order, so running them in
order on one thread keeps MPI's matching identical on every rank while the main
thread computes. The engine owns a duplicate of the communicator, so its traffic
never mixes with collectives the main thread issues directly. mpi4py releases
the GIL inside MPI calls and NumPy inside large kernels: the overlap is real.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time

import numpy as np

log = logging.getLogger("hpc_train.comm")


class Handle:
    """The pending result of an asynchronous collective."""

    def __init__(self, name: str, sequence: int = 0):
        self.name = name
        self.sequence = sequence  # 1-based position in this rank's submission order
        self.started = self.finished = None  # perf_counter() on the engine thread
        self._done = threading.Event()
        self._result = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None):
        """Block until complete; return the result or raise the collective's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"collective {self.name!r} did not complete within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def _finish(self, result=None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self.finished = time.perf_counter()
        self._done.set()


class ProgressBoard:
    """How many collectives each rank has submitted, readable by any rank without its help.

    A one-sided window: a rank writes its own count; a stalled rank reads all counts
    (passive target) to name the ranks that never joined.
    """

    def __init__(self, comm):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm
        self.win = MPI.Win.Allocate(8, 8, comm=comm)
        self.mine = np.frombuffer(self.win.tomemory(), np.int64, count=1)
        self.publish(0)
        comm.Barrier()

    def publish(self, count: int) -> None:
        rank = self.comm.Get_rank()
        self.win.Lock(rank, self._mpi.LOCK_EXCLUSIVE)
        self.mine[0] = count
        self.win.Unlock(rank)

    def read_all(self) -> list[int]:
        counts, value = [], np.zeros(1, np.int64)
        for q in range(self.comm.Get_size()):
            self.win.Lock(q, self._mpi.LOCK_SHARED)
            self.win.Get(value, q)
            self.win.Unlock(q)
            counts.append(int(value[0]))
        return counts


class Engine:
    def __init__(self, comm):
        from mpi4py import MPI

        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError(
                "asynchronous collectives need MPI_THREAD_MULTIPLE; the MPI library provided "
                f"level {MPI.Query_thread()} (check mpi4py.rc.thread_level and the MPI build)"
            )
        self.comm = comm.Dup()
        self.board = ProgressBoard(self.comm)
        self.submitted = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="hpc_train-engine", daemon=True)
        self._thread.start()

    def submit(self, fn, name: str) -> Handle:
        """Queue fn(comm) -> result; identical submission order on every rank is the caller's duty."""
        self.submitted += 1
        handle = Handle(name, self.submitted)
        self.board.publish(self.submitted)
        self._queue.put((fn, handle))
        return handle

    def wait_watched(self, handle: Handle, warning_s: float, abort_s: float):
        """handle.wait(), naming the ranks that have not joined every warning_s; abort after abort_s."""
        waited = 0.0
        while True:
            try:
                return handle.wait(timeout=min(warning_s, max(abort_s - waited, 0.001)))
            except TimeoutError:
                waited += min(warning_s, max(abort_s - waited, 0.001))
            counts = self.board.read_all()
            missing = [q for q, n in enumerate(counts) if n < handle.sequence]
            where = ", ".join(f"rank {q} at #{counts[q]}" for q in missing) or "none (all submitted it)"
            message = (f"collective {handle.name!r} (#{handle.sequence}) stalled for {waited:.0f} s; "
                       f"ranks that have not submitted it: {where}")
            if waited >= abort_s:
                log.critical("%s; aborting the job after %.0f s", message, abort_s)
                from mpi4py import MPI

                MPI.COMM_WORLD.Abort(1)
            log.warning(message)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, handle = item
            handle.started = time.perf_counter()
            try:
                handle._finish(result=fn(self.comm))
            except BaseException as exc:  # handed to the waiter, re-raised there
                handle._finish(error=exc)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()


_engine: Engine | None = None
_engine_lock = threading.Lock()


def engine() -> Engine:
    """The process's engine, started on first use (collective: every rank must reach it)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            from .. import runtime

            _engine = Engine(runtime.world())
            atexit.register(_shutdown)  # runs before mpi4py's own finalize (LIFO)
        return _engine


def _shutdown() -> None:
    global _engine
    if _engine is not None:
        _engine.stop()
        _engine = None

"""The background engine: one thread that runs queued collectives in submission order.

Every rank submits the same collectives in the same order, so running them in
order on one thread keeps MPI's matching identical on every rank while the main
thread computes. The engine owns a duplicate of the communicator, so its traffic
never mixes with collectives the main thread issues directly. mpi4py releases
the GIL inside MPI calls and NumPy inside large kernels: the overlap is real.
It remembers its last RECENT collectives (name, what they move, state): the flight
record `dump_forensics()` prints beside every thread's stack when a stall is reported.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import faulthandler
import logging
import queue
import socket
import sys
import threading
import time

import numpy as np

from ..runtime import abort

log = logging.getLogger("hpc_train.comm")
RECENT = 32  # collectives the engine remembers for a stall report
FORENSICS_LOGGED = "every rank logged its thread stacks and last collectives at the first stall warning"


class Flight:
    """A collective as the flight record keeps it: what it is and where it stands, never its result
    (a record of results kept the last RECENT collectives' buffers alive: ZeRO 3's gathered layers
    held several copies of the model that way)."""

    def __init__(self, name: str, sequence: int, detail: str):
        self.name, self.detail = name, detail  # detail: what it moves (operation, shape, dtype)
        self.sequence = sequence  # 1-based position in this rank's submission order
        self.submitted = time.perf_counter()
        self.started = self.finished = None  # perf_counter() on the engine thread
        self.failure: str | None = None  # the error's type, if it failed

    def describe(self, now: float) -> str:
        """One line for a flight record: sequence, name, what it moves, and where it stands."""
        if self.started is None:
            state = f"queued for {now - self.submitted:.1f} s"
        elif self.finished is None:
            state = f"RUNNING for {now - self.started:.1f} s"
        else:
            outcome = f"failed ({self.failure})" if self.failure is not None else "done"
            state = f"{outcome} in {1e3 * (self.finished - self.started):.2f} ms"
        return f"#{self.sequence} {self.name!r} {self.detail}: {state}".replace("  ", " ")


class Handle:
    """The pending result of an asynchronous collective; its `flight` is what the engine remembers."""

    def __init__(self, name: str, sequence: int = 0, detail: str = ""):
        self.flight = Flight(name, sequence, detail)
        self._done = threading.Event()
        self._result = None
        self._error: BaseException | None = None

    name = property(lambda self: self.flight.name)
    detail = property(lambda self: self.flight.detail)
    sequence = property(lambda self: self.flight.sequence)
    started = property(lambda self: self.flight.started)
    finished = property(lambda self: self.flight.finished)

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None):
        """Block until complete; return the result or raise the collective's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"collective {self.name!r} did not complete within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def describe(self, now: float) -> str:
        return self.flight.describe(now)

    def _start(self) -> None:
        self.flight.started = time.perf_counter()

    def _finish(self, result=None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self.flight.failure = type(error).__name__ if error is not None else None
        self.flight.finished = time.perf_counter()
        self._done.set()


class ProgressBoard:
    """What each rank has reached, readable by any rank without its help.

    Two counters per rank: collectives submitted to the engine, and a heartbeat the
    training loop bumps every step. A stalled rank reads them to name the ranks that
    never joined, or that do not answer at all because their node is unreachable.
    Ranks on this rank's host are read from a node-shared segment (plain loads): MPICH's
    passive-target Get waits until the target enters MPI, which a rank stuck in Python
    never does. Ranks on other hosts are read through a one-sided window (passive target).
    """

    SUBMITTED, HEARTBEAT = 0, 1

    def __init__(self, comm):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm
        self.win = MPI.Win.Allocate(16, 8, comm=comm)
        self.mine = np.frombuffer(self.win.tomemory(), np.int64, count=2)
        self.host = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.shared = MPI.Win.Allocate_shared(16, 8, comm=self.host)
        host_ranks = MPI.Group.Translate_ranks(self.host.Get_group(), list(range(self.host.Get_size())),
                                               comm.Get_group())
        self.on_host = {q: np.frombuffer(self.shared.Shared_query(i)[0], np.int64, count=2)
                        for i, q in enumerate(host_ranks)}
        self.publish(0, self.SUBMITTED)
        self.publish(0, self.HEARTBEAT)
        comm.Barrier()

    def publish(self, count: int, slot: int = SUBMITTED) -> None:
        rank = self.comm.Get_rank()
        self.on_host[rank][slot] = count
        self.win.Lock(rank, self._mpi.LOCK_EXCLUSIVE)
        self.mine[slot] = count
        self.win.Unlock(rank)

    def read_all(self, slot: int = SUBMITTED, timeout: float = 5.0) -> list[int | None]:
        """Every rank's counter; None for a rank that did not answer within timeout.

        One reader thread per rank on another host: a Get to a rank behind a cut link never
        returns, and must not keep the others from being read.
        """
        size = self.comm.Get_size()
        counts: list[int | None] = [None] * size
        for q, counters in self.on_host.items():
            counts[q] = int(counters[slot])

        def read(q: int) -> None:
            value = np.zeros(2, np.int64)
            locked = False
            try:
                self.win.Lock(q, self._mpi.LOCK_SHARED)
                locked = True
                self.win.Get(value, q)
                self.win.Unlock(q)
            except self._mpi.Exception:  # a peer that has gone (the job ending, a lost node) did not answer
                if locked:  # never leave q's window locked: q's own publish would wait for it forever
                    with contextlib.suppress(self._mpi.Exception):
                        self.win.Unlock(q)
                return
            counts[q] = int(value[slot])

        readers = [threading.Thread(target=read, args=(q,), daemon=True, name=f"board-read-{q}")
                   for q in range(size) if q not in self.on_host]
        for t in readers:
            t.start()
        deadline = time.monotonic() + timeout
        for t in readers:
            t.join(max(0.0, deadline - time.monotonic()))
        return counts

    def free(self) -> None:
        """Free the windows (collective)."""
        self.on_host = {}
        self.shared.Free()
        self.host.Free()
        self.win.Free()


def open_board(comm) -> ProgressBoard | None:
    """The progress board, or None (logged) where this MPI cannot open one-sided windows here."""
    from mpi4py import MPI

    try:
        return ProgressBoard(comm)
    except MPI.Exception as exc:
        log.warning("no progress board (MPI_Win_allocate failed: %s): stalls will be detected but the "
                    "missing ranks not named; with Open MPI 4.1 over TCP set OMPI_MCA_osc=sm,ucx", exc)
        return None


class Engine:
    def __init__(self, comm):
        from mpi4py import MPI

        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError(
                "asynchronous collectives need MPI_THREAD_MULTIPLE; the MPI library provided "
                f"level {MPI.Query_thread()} (check mpi4py.rc.thread_level and the MPI build)"
            )
        self.comm = comm.Dup()
        self.board = open_board(self.comm)
        self.submitted = 0
        self.recent: collections.deque[Flight] = collections.deque(maxlen=RECENT)  # the flight record
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="hpc_train-engine", daemon=True)
        self._thread.start()

    def submit(self, fn, name: str, detail: str = "") -> Handle:
        """Queue fn(comm) -> result; identical submission order on every rank is the caller's duty."""
        self.submitted += 1
        handle = Handle(name, self.submitted, detail)
        self.recent.append(handle.flight)
        if self.board is not None:
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
            message = (f"collective {handle.name!r} (#{handle.sequence}) stalled for {waited:.0f} s; "
                       f"{self.who_is_missing(handle.sequence)}")
            if waited >= abort_s:
                abort(f"{message}; aborting the job after {abort_s:.0f} s ({FORENSICS_LOGGED})")
            log.warning(message)
            if waited <= warning_s:  # the first warning of this stall
                dump_forensics()

    def who_is_missing(self, sequence: int, slot: int = ProgressBoard.SUBMITTED, what: str = "submitted it",
                       timeout: float = 5.0) -> str:
        """Which ranks are behind `sequence` on the board, and which do not answer within timeout."""
        if self.board is None:
            return "the ranks behind cannot be named (no progress board)"
        counts = self.board.read_all(slot, timeout)
        silent = [q for q, n in enumerate(counts) if n is None]
        behind = [q for q, n in enumerate(counts) if n is not None and n < sequence]
        parts = [f"ranks that have not {what}: " + (", ".join(f"rank {q} at #{counts[q]}" for q in behind)
                                                     or "none")]
        if silent:
            parts.append(f"ranks that do not answer (node unreachable or hung): {describe_ranks(silent)}")
        return "; ".join(parts)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, handle = item
            handle._start()
            try:
                handle._finish(result=fn(self.comm))
            except BaseException as exc:  # handed to the waiter, re-raised there
                handle._finish(error=exc)

    def stop(self) -> None:
        """End the thread and free the window and the communicator (collective: at exit, every rank).

        MPICH 4.0.2 over UCX aborts in MPI_Finalize (SIGABRT, a failed job) when a window
        allocated with MPI_Win_allocate is still alive; Open MPI let it pass."""
        self._queue.put(None)
        self._thread.join()
        if self.board is not None:
            self.board.free()
            self.board = None
        self.comm.Free()


def dump_forensics() -> None:
    """This rank's flight record to stderr, like PyTorch's: the stack of every thread (faulthandler)
    and the engine's last RECENT collectives, where the hang is read from when a stall is reported."""
    from .. import runtime

    now, flights = time.perf_counter(), list(engine().recent)
    where = f"rank {runtime.rank()} on {socket.gethostname()}"
    lines = [f"--- {where}: the last {len(flights)} collectives of the engine, oldest first ---",
             *(f.describe(now) for f in flights), f"--- {where}: the stack of every thread ---"]
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()


def describe_ranks(ranks: list[int]) -> str:
    """'2, 3 (on node1)': ranks with the hosts they run on."""
    from .. import runtime

    hosts = runtime.hostnames()
    by_host: dict[str, list[int]] = {}
    for q in ranks:
        by_host.setdefault(hosts[q], []).append(q)
    return "; ".join(f"{', '.join(map(str, qs))} (on {host})" for host, qs in by_host.items())


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

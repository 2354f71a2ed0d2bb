"""The background engine: one thread that runs queued collectives in submission order.

Every rank submits the same collectives in the same order, so running them in
order on one thread keeps MPI's matching identical on every rank while the main
thread computes. The engine owns a duplicate of the communicator, so its traffic
never mixes with collectives the main thread issues directly. mpi4py releases
the GIL inside MPI calls and NumPy inside large kernels: the overlap is real.
"""

from __future__ import annotations

import atexit
import queue
import threading


class Handle:
    """The pending result of an asynchronous collective."""

    def __init__(self, name: str):
        self.name = name
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
        self._done.set()


class Engine:
    def __init__(self, comm):
        from mpi4py import MPI

        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError(
                "asynchronous collectives need MPI_THREAD_MULTIPLE; the MPI library provided "
                f"level {MPI.Query_thread()} (check mpi4py.rc.thread_level and the MPI build)"
            )
        self.comm = comm.Dup()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="hpc_train-engine", daemon=True)
        self._thread.start()

    def submit(self, fn, name: str) -> Handle:
        """Queue fn(comm) -> result; identical submission order on every rank is the caller's duty."""
        handle = Handle(name)
        self._queue.put((fn, handle))
        return handle

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, handle = item
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

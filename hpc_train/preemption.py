"""Preemption: a signal asks the job to stop; every rank stops at the same step.

Slurm warns a job before its time limit or a preemption with a signal (`--signal=B:USR1@120`,
forwarded to the ranks by the batch script; SIGTERM to the tasks at the limit), and Open MPI's
mpirun passes USR1/USR2 on and answers TERM by terminating the ranks. `watch()` turns the
watched signals into a flag instead of death; `preempted()` combines the flags of every rank (a
collective: call it at the same point on every rank, e.g. each step boundary), so ranks that got
the signal at different steps, or one rank alone, still stop at the same step. What to do then
(write a checkpoint, exit with `EXIT_PREEMPTED` so that the batch script requeues the job) is
the caller's: `hpc-train train` does exactly that.

    import hpc_train as ht
    ht.init(); ht.preemption.watch()
    for step in range(start, steps):
        train_one_step()
        if ht.preempted():
            save_my_checkpoint(step)          # e.g. hpc_train.checkpoint.save
            raise SystemExit(ht.preemption.EXIT_PREEMPTED)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np

from . import settings

log = logging.getLogger("hpc_train")

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: "a temporary failure; the user is invited to retry"
DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")
UNWATCHABLE = ("SIGKILL", "SIGSTOP")

_received: int = 0  # the first watched signal this process received (0: none)
_received_at: float = 0.0  # its time.monotonic()
_previous: dict[int, object] = {}  # signal number -> the handler watch() replaced


def signal_number(name: str) -> int:
    """The number of a signal named "SIGUSR1", "USR1" or "10"; ValueError naming the bad name."""
    text = name.strip().upper()
    if text.isdigit():
        number = int(text)
    else:
        try:
            number = signal.Signals[text if text.startswith("SIG") else "SIG" + text].value
        except KeyError:
            raise ValueError(f"unknown signal {name!r}") from None
    if number not in {int(s) for s in signal.valid_signals()} or signal_name(number) in UNWATCHABLE:
        raise ValueError(f"signal {name!r} cannot be caught")
    return number


def signal_name(number: int) -> str:
    """"SIGUSR1" for 10; real-time signals without a name of their own read "SIG34"."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def _handle(signum, _frame) -> None:
    global _received, _received_at
    if not _received:
        _received, _received_at = signum, time.monotonic()
        log.warning("%s received: stopping at the next step boundary", signal_name(signum))


def watch(signals=DEFAULT_SIGNALS) -> None:
    """From now on the signals (names or numbers) set this rank's preemption flag instead of
    their default action. Call from the main thread (Python runs handlers there); idempotent."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("hpc_train.preemption.watch() must be called from the main thread "
                           "(Python delivers signals only there)")
    for name in signals:
        number = signal_number(str(name))
        if number not in _previous:
            _previous[number] = signal.signal(number, _handle)


def unwatch() -> None:
    """Give the watched signals back the handlers watch() replaced, and clear the flag."""
    global _received, _received_at
    for number, handler in _previous.items():
        signal.signal(number, handler)
    _previous.clear()
    _received, _received_at = 0, 0.0


def received() -> int:
    """The watched signal this rank received (its number), 0 if none. Local: no communication."""
    return _received


def seconds_since_signal() -> float | None:
    """Seconds since this rank received its signal, None if it received none."""
    return time.monotonic() - _received_at if _received else None


def agreed_signal(requested: int | None = None, comm=None) -> int:
    """Collective over `comm` (default: the world): the largest signal number any rank received
    (or passes as `requested`), 0 when none did. Every rank returns the same value."""
    from .comm import allreduce

    flag = np.array([_received if requested is None else requested], np.int64)
    return int(allreduce(flag, op="max", comm=comm, name="preemption")[0])


def preempted(comm=None) -> bool:
    """Collective: True on every rank once any rank of `comm` received a watched signal."""
    return agreed_signal(comm=comm) != 0


def grace_s(signum: int) -> float | None:
    """The seconds a job has between the signal and being killed, where known: the batch script's
    `--signal` lead time (HPC_TRAIN_PREEMPT_GRACE_S), or for SIGTERM under Open MPI's mpirun its
    TERM-to-KILL delay (`odls_base_sigkill_timeout`, 1 s unless raised)."""
    grace = settings.current().preempt_grace_s
    if grace is not None:
        return grace
    if signum == signal.SIGTERM and "OMPI_COMM_WORLD_RANK" in os.environ:
        try:
            return float(os.environ.get("OMPI_MCA_odls_base_sigkill_timeout", "1"))  # noqa: SIM112 (MCA spelling)
        except ValueError:
            return None
    return None

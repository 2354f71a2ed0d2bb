"""A job-level stall watchdog: the training loop beats every step; silence ends the job.

The engine's own watchdog (Engine.wait_watched) only sees waits for the engine's
collectives. A rank can also hang inside a direct collective, in I/O, or waiting
for a node whose link was cut, where no MPI call will ever return. Here a thread
watches the time since the last beat: after `warning_s` it logs the ranks behind
(from the progress board's heartbeat slot) and the ranks that do not answer at
all, and dumps its flight record (every thread's stack, the engine's last collectives)
once per stall; after `abort_s` it aborts the whole job, naming them.
"""

from __future__ import annotations

import logging
import threading
import time

from ..runtime import abort
from .engine import FORENSICS_LOGGED, ProgressBoard, dump_forensics, engine

log = logging.getLogger("hpc_train.comm")


class StallWatchdog:
    def __init__(self, warning_s: float, abort_s: float):
        self.warning_s, self.abort_s = warning_s, abort_s
        self._engine = engine()
        self.beats = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hpc_train-watchdog", daemon=True)

    def start(self) -> StallWatchdog:
        self._last = time.monotonic()
        self._thread.start()
        return self

    def beat(self) -> None:
        """The loop made progress (a step, an evaluation batch)."""
        self.beats += 1
        self._last = time.monotonic()
        if self._engine.board is not None:
            self._engine.board.publish(self.beats, ProgressBoard.HEARTBEAT)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _describe(self, idle: float) -> str:
        # a silent rank costs the whole read timeout: keep it short of the next check
        behind = self._engine.who_is_missing(self.beats, ProgressBoard.HEARTBEAT, f"reached beat {self.beats}",
                                             timeout=min(5.0, max(0.5, self.warning_s / 2)))
        return f"no progress for {idle:.0f} s (after beat {self.beats}); {behind}"

    def _watch(self) -> None:
        warn_at = self.warning_s
        while not self._stop.wait(min(1.0, self.warning_s / 4)):
            idle = time.monotonic() - self._last
            if idle >= self.abort_s:
                abort(f"{self._describe(idle)}; aborting the job after {self.abort_s:.0f} s (stall_abort_s; "
                      f"{FORENSICS_LOGGED})")
                return
            if idle >= warn_at:
                log.warning(self._describe(idle))
                if warn_at == self.warning_s:  # the first warning of this stall
                    dump_forensics()
                warn_at += self.warning_s
            elif idle < self.warning_s:
                warn_at = self.warning_s

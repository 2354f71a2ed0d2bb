"""exitall: when a job copy finishes, the copies it takes with it stop too, on every rank.

fio's rule: `exitall` (set on any job) makes every job that finishes terminate others, chosen by
the finishing job's `exit_what`: `group` (its reporting group, in any level, so a later
`wait_for` job of that group does no I/O), `all` (every job, later ones included) or
`stonewall` (the jobs running now, i.e. of its level; later levels run). A stopped copy ends
after the run in flight (at most EXIT_CHECK_BYTES) and reports what it did, as fio's does.

Across ranks (`ExitBoard`): a rank that sees a copy finish sends (group, level, exit_what) to
every other rank; a listener thread on each rank polls for them (Iprobe, every millisecond). At
the end of every level the ranks agree on how many were sent and wait until each has arrived,
so a message never crosses into the next level late.
"""

from __future__ import annotations

import threading
import time

EXIT_CHECK_BYTES = 16 << 20  # a stopping copy looks between runs of at most this many bytes
TAG = 0x6578  # "ex"
SETTLE_TIMEOUT_S = 60


class Exits:
    """Which jobs must stop, on this rank: marked by finished copies here and on other ranks."""

    def __init__(self):
        self.lock = threading.Lock()
        self.groups: set[int] = set()
        self.levels: set[int] = set()
        self.everything = False

    def apply(self, group: int, level: int, what: str) -> None:
        with self.lock:
            if what == "all":
                self.everything = True
            elif what == "stonewall":
                self.levels.add(level)
            else:
                self.groups.add(group)

    def stopped(self, job) -> bool:
        with self.lock:
            return self.everything or job.groupid in self.groups or job.level in self.levels


class ExitBoard:
    """Exits shared by the ranks of `comm` (a duplicate of it carries the messages)."""

    def __init__(self, comm):
        self.exits = Exits()
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.announced = self.received = 0
        self.requests: list = []
        self.arrived = threading.Condition()
        self.closing = threading.Event()
        self.listener = threading.Thread(target=self._listen, name="iobench-exitall", daemon=True)
        if self.size > 1:
            self.listener.start()

    def finished(self, job) -> None:
        """A copy of `job` finished: stop what its exit_what names, here and on every rank."""
        message = (job.groupid, job.level, job.options["exit_what"])
        self.exits.apply(*message)
        with self.arrived:
            self.announced += 1
            self.requests += [self.comm.isend(message, dest=r, tag=TAG) for r in range(self.size) if r != self.rank]

    def stopped(self, job) -> bool:
        return self.exits.stopped(job)

    def _listen(self) -> None:
        while not self.closing.is_set():
            if not self.comm.Iprobe(tag=TAG):
                time.sleep(0.001)
                continue
            self.exits.apply(*self.comm.recv(tag=TAG))
            with self.arrived:
                self.received += 1
                self.arrived.notify_all()

    def settle(self) -> None:
        """Collective, at the end of a level: wait until every message any rank sent has arrived."""
        total = self.comm.allreduce(self.announced)
        expected = (total - self.announced) if self.size > 1 else 0
        with self.arrived:
            if not self.arrived.wait_for(lambda: self.received >= expected, timeout=SETTLE_TIMEOUT_S):
                raise TimeoutError(f"exitall: rank {self.rank} got {self.received} of the {expected} messages other "
                                   f"ranks sent within {SETTLE_TIMEOUT_S} s")

    def close(self) -> None:
        self.closing.set()
        if self.listener.is_alive():
            self.listener.join()
        for request in self.requests:
            request.wait()
        self.comm.Free()

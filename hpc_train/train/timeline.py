"""Chrome trace (chrome://tracing, Perfetto) of one training run: one process per rank.

Spans are recorded on each rank and, at the end, gathered to rank 0, which writes a single
JSON file (temporary name, then renamed). So that a job that is aborted, killed or hangs
still leaves its trace, a thread of every rank also appends its spans to its own part file
(`PATH.rank-N.json`) every FLUSH_S seconds, in Chrome's JSON array format, which
readers accept without the closing bracket: each part file is a valid trace at any moment.
A run that ends normally removes the part files once the single file is written.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

FLUSH_S = 2.0


class Timeline:
    def __init__(self, path: str | Path = "", comm=None):
        self.enabled = bool(path)
        self.events: list[dict] = []
        if comm is not None:
            comm.Barrier()  # a common origin, up to the barrier's skew
        self.origin = time.perf_counter()
        self._part = None
        if self.enabled and comm is not None:
            rank = comm.Get_rank()
            self._part = part_path(path, rank)
            self._part.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._part.open("w")
            self._file.write("[\n" + json.dumps({"name": "process_name", "ph": "M", "pid": rank,
                                                 "args": {"name": f"rank {rank}"}}))
            self._rank, self._threads, self._written = rank, {}, 0
            self._lock, self._stop = threading.Lock(), threading.Event()
            self._flusher = threading.Thread(target=self._flush_every, name="hpc_train-timeline", daemon=True)
            self._flusher.start()

    def add(self, name: str, cat: str, start: float, end: float, tid: str = "main") -> None:
        """A complete span between two perf_counter() readings (any thread)."""
        if self.enabled:
            self.events.append({"name": name, "cat": cat, "ph": "X", "tid": tid,
                                "ts": (start - self.origin) * 1e6, "dur": (end - start) * 1e6})

    @contextmanager
    def span(self, name: str, cat: str, tid: str = "main"):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, cat, start, time.perf_counter(), tid)

    def _flush_every(self) -> None:
        while not self._stop.wait(FLUSH_S):  # a thread of its own: a main thread that hangs still flushes
            self.flush()

    def flush(self) -> None:
        """Append the spans recorded since the last flush to this rank's part file."""
        with self._lock:
            pending, self._written = self.events[self._written:], len(self.events)
            lines = []
            for event in pending:
                if event["tid"] not in self._threads:
                    self._threads[event["tid"]] = len(self._threads)
                    lines.append({"name": "thread_name", "ph": "M", "pid": self._rank,
                                  "tid": self._threads[event["tid"]], "args": {"name": event["tid"]}})
                lines.append({**event, "pid": self._rank, "tid": self._threads[event["tid"]]})
            self._file.write("".join(",\n" + json.dumps(line) for line in lines))
            self._file.flush()

    def write(self, path: str | Path, comm) -> None:
        """Gather every rank's spans to rank 0 and write one trace file; the part files go (collective)."""
        gathered = comm.gather(self.events, root=0)
        if comm.Get_rank() == 0:
            trace, threads = [], {}
            for rank, events in enumerate(gathered):
                trace.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
                for event in events:
                    tid = threads.setdefault(event["tid"], len(threads))
                    trace.append({**event, "pid": rank, "tid": tid})
            for rank in range(len(gathered)):  # thread ids are numbers in the format; names go in metadata
                trace.extend({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}}
                             for name, tid in threads.items())
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            partial.write_text(json.dumps({"traceEvents": trace, "displayTimeUnit": "ms"}))
            os.replace(partial, path)
        comm.Barrier()  # the single file is in place before any part file goes
        if self._part is not None:
            self._stop.set()
            self._flusher.join()
            self._file.close()
            self._part.unlink(missing_ok=True)
            self._part = None


def part_path(path: str | Path, rank: int) -> Path:
    """Where rank `rank` keeps the spans of the trace `path` while the run lasts."""
    path = Path(path)
    return path.with_name(f"{path.name}.rank-{rank}.json")

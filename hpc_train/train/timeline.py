"""Chrome trace (chrome://tracing, Perfetto) of one training run: one process per rank.

Spans are recorded on each rank in memory and gathered to rank 0 at the end,
which writes a single JSON file (temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path


class Timeline:
    def __init__(self, enabled: bool, comm=None):
        self.enabled = enabled
        self.events: list[dict] = []
        if comm is not None:
            comm.Barrier()  # a common origin, up to the barrier's skew
        self.origin = time.perf_counter()

    def add(self, name: str, cat: str, start: float, end: float, tid: str = "main") -> None:
        """A complete span between two perf_counter() readings."""
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

    def write(self, path: str | Path, comm) -> None:
        """Gather every rank's spans to rank 0 and write one trace file (collective)."""
        gathered = comm.gather(self.events, root=0)
        if comm.Get_rank() != 0:
            return
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

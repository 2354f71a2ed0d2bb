"""The run's metrics: one JSON object a line (step, epoch, checkpoint, resume, summary records).

Rank 0 writes; the other ranks hold a log that drops records, so callers never ask
which rank they are on. Every record is flushed as written: a job that is killed
keeps what it logged. Every record carries the run's identity (`run_id`, and `attempt`:
0, then one more at every resume); a resumed run appends to the file, so a run
interrupted several times reads as one run (where steps were redone after a restart,
the records of the latest attempt are the ones that count).
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: str, rank: int, identity: dict | None = None, append: bool = False):
        self._file = None
        self._identity = identity or {}
        if rank == 0 and path:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._file = target.open("a" if append else "w")

    def emit(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps({**record, **self._identity}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

"""The run's metrics: one JSON object a line (step, epoch, checkpoint, resume, summary records).

Rank 0 writes; the other ranks hold a log that drops records, so callers never ask
which rank they are on. Every record is flushed as written: a job that is killed
keeps what it logged. Every record carries the run's identity (`run_id`, and `attempt`:
0, then one more at every resume) and the wall-clock time it was written (`time`, seconds
since the epoch); a resumed run appends to the file, so a run interrupted several times
reads as one run (where steps were redone after a restart, the records of the latest
attempt are the ones that count; they carry `"redone": true`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, path: str, rank: int, identity: dict | None = None, resumed_at: int | None = None,
                 tensorboard: str = ""):
        """`resumed_at`: the step a resumed run continues after (None: a fresh run, which starts the
        file anew); `tensorboard`: a folder for TensorBoard event files as well."""
        self._file = self._board = None
        self._identity = identity or {}
        self._redone_until = 0  # steps an earlier attempt logged past the checkpoint resumed from
        if rank == 0 and path:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            if resumed_at is not None:
                self._redone_until = last_step(target)
            self._file = target.open("w" if resumed_at is None else "a")
        if rank == 0 and tensorboard:
            from .tensorboard_log import TensorBoardLog

            self._board = TensorBoardLog(tensorboard, resumed_at)

    def emit(self, record: dict) -> None:
        full = {**record, **self._identity, "time": round(time.time(), 3)}
        if record["type"] == "step" and record["step"] <= self._redone_until:
            full["redone"] = True
        if self._file is not None:
            self._file.write(json.dumps(full) + "\n")
            self._file.flush()
        if self._board is not None:
            self._board.emit(full)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._board is not None:
            self._board.close()
            self._board = None


def read_run(path: Path) -> list[dict]:
    """The records of a metrics file as one run: of a step logged by several attempts (redone
    after a restart), only the latest attempt's record."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {r["step"]: i for i, r in enumerate(records) if r["type"] == "step"}
    return [r for i, r in enumerate(records) if r["type"] != "step" or latest[r["step"]] == i]


def last_step(path: Path) -> int:
    """The highest step a step record of a metrics file reached (0 if none, or no file)."""
    if not path.is_file():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if '"type": "step"' in line),
               default=0)

"""TensorBoard event files for `[log] tensorboard = "DIR"`, through the tensorboard package's own
event writer (the optional extra `hpc_train[tensorboard]`; TensorFlow is not needed).

Every numeric field of the step and epoch records becomes a scalar (`step/loss`,
`epoch/val_accuracy`...) at the record's step and wall-clock time. A resumed run writes a new
event file into the same folder that starts with TensorBoard's restart marker (a START session
log at the first step it will write): readers drop the earlier attempt's events from that step
on, so steps redone after a restart count once, from the latest attempt, and the folder reads
as one run. Events reach the file every 2 s and at every checkpoint, so a killed job keeps
what its resume will not redo.
"""

from __future__ import annotations

import numbers

RECORDS = ("step", "epoch")  # the record types whose figures are plotted
FLUSH_S = 2  # the writer's thread writes its events at least this often (its default: 120 s)


def available() -> str | None:
    """None if the tensorboard package can be used, else why not."""
    try:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


class TensorBoardLog:
    def __init__(self, directory: str, resumed_at: int | None = None):
        """Event files in `directory`; `resumed_at`: the step a resumed run continues after."""
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self._writer = EventFileWriter(directory, flush_secs=FLUSH_S)
        if resumed_at is not None:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._writer.add_event(event_pb2.Event(step=resumed_at + 1, session_log=start))

    def emit(self, record: dict) -> None:
        if record.get("type") == "checkpoint":  # what a resume will not redo is on disk
            self._writer.flush()
        if record.get("type") not in RECORDS:
            return
        values = [self._summary.Value(tag=f"{record['type']}/{key}", simple_value=float(value))
                  for key, value in record.items()
                  if isinstance(value, numbers.Real) and not isinstance(value, bool)
                  and key not in ("step", "epoch", "attempt", "time")]
        self._writer.add_event(self._event(wall_time=record["time"], step=record["step"],
                                           summary=self._summary(value=values)))

    def close(self) -> None:
        self._writer.close()

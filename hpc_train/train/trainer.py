"""The training loop behind `hpc-train train`: timed, logged, checkpointed.

The trainer drives two declared interfaces and nothing else: the model
(`nn.TrainableModel`: loss, backward, evaluation sums) and the strategy
(`optim.Strategy`, built from the job by `build.models_of(job)`: data parallel,
node-shared, ZeRO, parameter server for our NumPy models; hpc_train.torch's for torch
ones). Each step is split into data wait, forward, backward and optimizer step; the
part of the step the strategy spent waiting for communication is the exposed
(non-overlapped) communication. Rank 0 shows progress, writes JSONL metrics and
prints the summary; evaluation metrics are added up over ranks.

`train.max_steps` bounds the run's steps in total (0: epochs * steps per epoch);
`train.steps_per_epoch` bounds the steps of each epoch (0: the whole data set).

The signals of `checkpoint.signals` (SIGUSR1, SIGTERM: Slurm's warning before a time limit or a
preemption) stop the run at the step boundary where every rank knows of one, after a
checkpoint; `fit()` then ends with a "preempted" record whose exit code (75, `EXIT_PREEMPTED`)
tells the batch script to requeue the job (see `hpc_train.preemption`).
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from .. import checkpoint, preemption, runtime
from ..comm import allreduce
from ..comm.watchdog import StallWatchdog
from .build import build_loaders, limit_threads, models_of
from .config import JobFileError
from .metrics import MetricsLog
from .timeline import Timeline

PHASES = ("data", "forward", "backward", "step")


def _whole(minimum: int):
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= minimum


# What a resume takes from a checkpoint's attributes, checked before use (a file is not trusted).
RESUME_ATTRIBUTES = {
    "step": (_whole(0), "a whole number >= 0"), "epoch": (_whole(0), "a whole number >= 0"),
    "next_batch": (_whole(0), "a whole number >= 0"), "optimizer_steps": (_whole(0), "a whole number >= 0"),
    "world_size": (_whole(1), "a whole number >= 1"), "rng": (lambda v: isinstance(v, list), "a list of RNG states"),
}
OPTIONAL_RESUME_ATTRIBUTES = {  # absent from checkpoints of earlier releases
    "epoch_sample": (_whole(0), "a whole number >= 0"), "attempt": (_whole(0), "a whole number >= 0"),
    "run_id": (lambda v: isinstance(v, str) and 0 < len(v) <= 64, "a run id (text of at most 64 characters)"),
}
log = logging.getLogger("hpc_train")


class Trainer:
    def __init__(self, job: dict, timeline_path: str = ""):
        self.job = job
        rt = runtime.init()
        preemption.watch(job.checkpoint.signals)  # first: a signal while data loads stops at the first step
        self.comm = rt.world
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        threads = limit_threads(rt.topology.host_ranks)
        train = job.train
        if train.global_batch % self.size:
            raise JobFileError(f"train.global_batch = {train.global_batch} is not divisible by the "
                               f"{self.size} ranks of this job")
        self.batch = train.global_batch // self.size
        self.loader, self.val_loader, data = build_loaders(job, self.batch, self.rank, self.size)
        models = models_of(job)
        self.model = models.model(job, data, threads)
        self.steps_per_epoch = len(self.loader)
        if train.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, train.steps_per_epoch)
        self.total_steps = self.steps_per_epoch * train.epochs
        if train.max_steps:
            self.total_steps = min(self.total_steps, train.max_steps)
        self.timeline = Timeline(timeline_path, self.comm)
        self.timeline_path = timeline_path
        self.strategy = models.strategy(job, self.model, self.total_steps, self.timeline)
        dist = job.distributed
        self.watchdog = StallWatchdog(dist.stall_warning_s, dist.stall_abort_s)
        self.start_epoch = self.start_batch = self.start_step = 0
        self._last_checkpoint, self._last_checkpoint_step = None, -1
        resumed = self._resume()
        self.metrics = MetricsLog(job.log.metrics, self.rank, {"run_id": self.run_id, "attempt": self.attempt},
                                  resumed_at=None if resumed is None else self.start_step,
                                  tensorboard=job.log.tensorboard)
        if resumed is not None:
            self.metrics.emit(resumed)

    # -- checkpoints -------------------------------------------------------------------------------

    def _checkpoint(self, epoch: int, next_batch: int, step: int) -> Path:
        spec = self.job.checkpoint
        started = time.perf_counter()
        arrays = self.strategy.checkpoint_arrays()
        layout = self.strategy.checkpoint_layout()
        path = checkpoint.save(checkpoint.checkpoint_path(spec.directory, step), arrays, {
            "step": step, "epoch": epoch, "next_batch": next_batch, "world_size": self.size,
            "epoch_sample": next_batch * self.job.train.global_batch,
            "optimizer_steps": self.strategy.steps, "job": self.job.to_dict(), "rng": self.model.rng_states(),
            "run_id": self.run_id, "attempt": self.attempt,
            **({"layout": layout} if layout else {})}, self.comm)
        seconds = time.perf_counter() - started
        nbytes = checkpoint.logical_bytes(arrays)
        checkpoint.prune(spec.directory, spec.keep_last, self.comm)
        self.metrics.emit({"type": "checkpoint", "step": step, "path": str(path), "bytes": nbytes,
                           "seconds": seconds, "write_gbps": nbytes / seconds / 1e9})
        self._last_checkpoint, self._last_checkpoint_step = path, step
        return path

    def _resume(self) -> dict | None:
        """Continue from the job's checkpoint, if it names one; the "resume" record, or None for a fresh
        run. Either way sets the run's identity: a fresh run gets a new id (rank 0's, for all)."""
        spec = self.job.checkpoint
        self.run_id, self.attempt = self.comm.bcast(uuid.uuid4().hex if self.rank == 0 else None, root=0), 0
        if not spec.resume:
            return None
        if spec.resume == "auto":
            found = checkpoint.complete_checkpoints(spec.directory)
            if not found:
                return None  # nothing yet: a fresh start
            path = found[-1]
        else:
            path = Path(spec.resume)
        current = self.strategy.checkpoint_arrays()
        started = time.perf_counter()
        arrays, attrs = checkpoint.load_like(path, self.comm, current, self.strategy.checkpoint_layout())
        checkpoint.require(attrs, path, {**RESUME_ATTRIBUTES, **{k: v for k, v in OPTIONAL_RESUME_ATTRIBUTES.items()
                                                                 if k in attrs}})
        try:  # the same attributes on every rank: every rank fails alike, before any collective
            self.model.set_rng_states(attrs["rng"])
        except (ValueError, TypeError, KeyError) as exc:
            raise checkpoint.CheckpointError(f"{path}: attribute 'rng' does not fit this model ({exc})") from None
        self.strategy.load_checkpoint(arrays, attrs["optimizer_steps"])
        self.start_epoch, self.start_batch, self.start_step = attrs["epoch"], attrs["next_batch"], attrs["step"]
        if "epoch_sample" in attrs:  # where in the epoch's sample order: any rank count continues there
            self.start_batch, rest = divmod(attrs["epoch_sample"], self.job.train.global_batch)
            if rest:
                raise checkpoint.CheckpointError(
                    f"{path}: saved at sample {attrs['epoch_sample']} of epoch {attrs['epoch']}, which is not a "
                    f"multiple of train.global_batch = {self.job.train.global_batch}: resume with the global batch "
                    f"of the run that wrote it")
        if "run_id" in attrs:  # checkpoints written before runs had an identity start a new one
            self.run_id, self.attempt = attrs["run_id"], attrs.get("attempt", 0) + 1
        seconds = time.perf_counter() - started
        nbytes = checkpoint.logical_bytes(current)
        return {"type": "resume", "path": str(path), "step": self.start_step, "saved_by_ranks": attrs["world_size"],
                "bytes": nbytes, "seconds": seconds, "read_gbps": nbytes / seconds / 1e9}

    # -- evaluation and steps ----------------------------------------------------------------------

    def evaluate(self) -> dict:
        """The model's validation metrics over the whole validation set, every rank its share."""
        self.model.train(False)
        sums = 0.0
        with self.strategy.evaluation_parameters():
            for x, y in self.val_loader:
                self.watchdog.beat()
                sums = sums + self.model.evaluation_sums(x, y)
        self.model.train(True)
        return self.model.evaluation_metrics(allreduce(np.atleast_1d(sums), name="evaluate"))

    def _train_step(self, x, y, timings: dict) -> float:
        tl = self.timeline
        passes = self.strategy.passes_per_step
        self.strategy.zero_grad()
        loss_value = 0.0
        for xs, ys in zip(np.array_split(x, passes), np.array_split(y, passes), strict=True):
            t0 = time.perf_counter()
            with tl.span("forward", "compute"):
                loss_value += self.model.forward_loss(xs, ys) / passes
            t1 = time.perf_counter()
            with tl.span("backward", "compute"):
                self.model.backward()
            t2 = time.perf_counter()
            timings["forward"] += t1 - t0
            timings["backward"] += t2 - t1
        t2 = time.perf_counter()
        with tl.span("optimizer step", "compute"):
            self.strategy.step()
        timings["step"] += time.perf_counter() - t2
        timings["exposed"] += self.strategy.exposed_s
        return loss_value

    def _steps_in(self, epoch: int) -> int:
        """Steps epoch `epoch` runs: a whole epoch, or what `train.max_steps` leaves of it."""
        return max(0, min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch))

    def fit(self) -> dict:
        """Train to the end (the "summary" record), or until a watched signal (the "preempted" record,
        after a checkpoint where the strategy can write one): either way the last record emitted."""
        progress = self._progress_bar()
        self.watchdog.start()
        totals = dict.fromkeys((*PHASES, "exposed"), 0.0)
        step, started, metrics = self.start_step, time.perf_counter(), {}
        for epoch in range(self.start_epoch, self.job.train.epochs):
            steps = self._steps_in(epoch)
            if steps == 0:
                break
            epoch_times = dict.fromkeys(totals, 0.0)
            first = self.start_batch if epoch == self.start_epoch else 0
            losses, step, next_batch, signum = self._run_epoch(epoch, first, steps, step, epoch_times, progress)
            signum = preemption.agreed_signal(signum)  # collective: workers at their own pace stop together here
            if signum:
                return self._finish(self._stop(signum, epoch, next_batch, step), progress)
            metrics = self.evaluate()
            for k in totals:
                totals[k] += epoch_times[k]
            step_time = max(sum(epoch_times[k] for k in PHASES), 1e-9)
            record = {"type": "epoch", "epoch": epoch, "step": step,
                      "train_loss": float(np.mean(losses)) if losses else None, **metrics,
                      "samples_per_s": len(losses) * self.batch * self.size / step_time,
                      "exposed_comm_fraction": epoch_times["exposed"] / step_time,
                      "elapsed_s": time.perf_counter() - started, **self.strategy.step_metrics(len(losses))}
            self.metrics.emit(record)
            if progress is not None:
                shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items())
                progress.write(f"epoch {epoch}: {shown}, {record['samples_per_s']:.0f} samples/s")
        step_time = max(sum(totals[k] for k in PHASES), 1e-9)
        ran = max(step - self.start_step, 1)  # steps this run executed (a resumed run starts later)
        summary = {"type": "summary", **metrics, "steps": step,
                   "epochs": self.job.train.epochs, "ranks": self.size,
                   "parameters": self.model.num_parameters(),
                   "samples_per_s": ran * self.batch * self.size / step_time,
                   "step_ms": 1e3 * step_time / ran,
                   "exposed_comm_fraction": totals["exposed"] / step_time,
                   "split_ms": {k: 1e3 * v / ran for k, v in totals.items()},
                   "elapsed_s": time.perf_counter() - started, **self.strategy.run_metrics()}
        return self._finish(summary, progress)

    def _progress_bar(self):
        if self.rank != 0 or not self.job.log.progress:
            return None
        from tqdm import tqdm

        progress = tqdm(total=self.total_steps, unit="step", file=sys.stderr, mininterval=1.0,
                        dynamic_ncols=True, disable=None)
        progress.update(self.start_step)
        return progress

    def _run_epoch(self, epoch, first, steps, step, times, progress):
        """Steps `first`..`steps` of an epoch, or until a stop is agreed: (losses, step reached,
        next batch, signal stopped for or 0)."""
        log_every, every = self.job.log.every_steps, self.job.checkpoint.every_steps
        self.loader.max_batches = steps  # collective readers read no batch past the last step
        self.loader.set_epoch(epoch)
        batches = iter(self.loader)
        for _ in range(first):  # resumed mid-epoch: the same order, the done part skipped
            next(batches)
        losses = []
        for index in range(first, steps):
            t0 = time.perf_counter()
            with self.timeline.span("data wait", "data"):
                x, y = next(batches)
            times["data"] += time.perf_counter() - t0
            losses.append(self._train_step(x, y, times))
            self.watchdog.beat()
            step += 1
            if step % log_every == 0 or step == self.total_steps:
                self._log_step(epoch, step, losses, times, progress)
            if every and step % every == 0:
                self._checkpoint(epoch, index + 1, step)
            signum = self.strategy.agree_to_stop(preemption.received())
            if signum:
                return losses, step, index + 1, signum
        return losses, step, steps, 0

    def _stop(self, signum: int, epoch: int, next_batch: int, step: int) -> dict:
        """Stopped by a signal at a step boundary: checkpoint (if the strategy can), then the
        "preempted" record, which carries the exit code that tells a batch script what to do."""
        name = preemption.signal_name(signum)
        path = None
        if self.strategy.can_checkpoint:
            path = self._last_checkpoint if self._last_checkpoint_step == step else \
                self._checkpoint(epoch, next_batch, step)
        waited = preemption.seconds_since_signal()
        waited = float(allreduce(np.array([-1.0 if waited is None else waited]), op="max", name="preempted")[0])
        grace = preemption.grace_s(signum)
        if self.rank == 0 and grace is not None and waited > grace:
            log.warning("the job stopped %.1f s after %s, more than the %g s it had before being killed "
                        "(HPC_TRAIN_PREEMPT_GRACE_S, the --signal lead time): give the signal more lead time "
                        "or make checkpoints faster", waited, name, grace)
        return {"type": "preempted", "signal": name, "epoch": epoch, "step": step,
                "checkpoint": str(path) if path else None, "signal_to_stop_s": waited if waited >= 0 else None,
                "grace_s": grace, "exit_code": preemption.EXIT_PREEMPTED if path else 128 + signum}

    def _finish(self, record: dict, progress) -> dict:
        """Emit the run's last record and release everything the run holds (collective)."""
        if progress is not None:
            progress.close()
        self.watchdog.stop()
        self.strategy.close()
        self.metrics.emit(record)
        self.metrics.close()
        if self.timeline_path:
            self.timeline.write(self.timeline_path, self.comm)
        for loader in (self.loader, self.val_loader):
            loader.close()
        preemption.unwatch()
        return record

    def _log_step(self, epoch, step, losses, times, progress) -> None:
        window = losses[-self.job.log.every_steps:]
        if self.strategy.lockstep:
            loss = float(allreduce(np.array([np.mean(window)]), op="mean", name="loss")[0])
        else:  # workers run at their own pace: no collective here, this rank's own loss
            loss = float(np.mean(window))
        done = sum(times[k] for k in PHASES)
        steps_done = len(losses)
        rate = steps_done * self.batch * self.size / done if done else 0.0
        self.metrics.emit({"type": "step", "epoch": epoch, "step": step, "loss": loss, "lr": self.strategy.lr,
                           "samples_per_s": rate, "step_ms": 1e3 * done / steps_done,
                           "exposed_comm_ms": 1e3 * times["exposed"] / steps_done,
                           "data_ms": 1e3 * times["data"] / steps_done,
                           "optimizer_ms": 1e3 * times["step"] / steps_done,
                           **self.strategy.step_metrics(len(window))})
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.0f}", refresh=False)
            progress.update(step - progress.n)


def summary_line(summary: dict) -> str:
    """The line `hpc-train train` ends with: the run's result, or why and where it stopped."""
    if summary["type"] == "preempted":
        where = f"stopped by {summary['signal']} at step {summary['step']} (epoch {summary['epoch']})"
        if summary["checkpoint"] is None:
            return (f"hpc-train train: {where}; this strategy cannot checkpoint, nothing to resume from "
                    f"(exit code {summary['exit_code']})")
        return (f"hpc-train train: {where}; checkpoint {summary['checkpoint']} written "
                f"{summary['signal_to_stop_s'] or 0:.1f} s after the signal; resume with checkpoint.resume = "
                f"\"auto\" (exit code {summary['exit_code']}: preempted)")
    if "val_accuracy" in summary:
        quality = f"final val accuracy {summary['val_accuracy']:.4f}"
    elif "val_bits_per_byte" in summary:
        quality = f"final val bits per byte {summary['val_bits_per_byte']:.4f}"
    else:
        quality = f"final val loss {summary.get('val_loss', float('nan')):.4f}"
    return (f"hpc-train train: {quality} | "
            f"{summary['samples_per_s']:.0f} samples/s on {summary['ranks']} ranks | exposed communication "
            f"{100 * summary['exposed_comm_fraction']:.1f}% of step time | {summary['steps']} steps in "
            f"{summary['elapsed_s']:.1f} s")

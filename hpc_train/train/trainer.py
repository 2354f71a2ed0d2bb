"""The training loop behind `hpc-train train`: data-parallel, timed, logged.

Each step is split into data wait, forward, backward and optimizer step; the
part of the step spent waiting for gradient buckets after backward is the
exposed (non-overlapped) communication. Rank 0 shows progress, writes JSONL
metrics and prints the summary; evaluation metrics are averaged over ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .. import checkpoint, nn, optim, runtime
from ..comm import allreduce
from ..comm.watchdog import StallWatchdog
from ..data import ArrayLoader, DistributedSampler, synthetic_classification
from ..ps import staleness_summary
from .config import JobFileError, uses_node_shared
from .timeline import Timeline


def build_model(spec: dict, input_shape: tuple, classes: int):
    """The model of the job, checked against the data it will see."""
    features = int(np.prod(input_shape))
    if spec["name"] == "mlp":
        widths = tuple(spec["widths"])
        if widths[0] != features or widths[-1] < classes:
            raise JobFileError(f"model.widths = {list(widths)} does not fit the data: images of shape "
                               f"{tuple(input_shape)} have {features} features and there are {classes} classes")
        return nn.mlp(widths, activation=spec["activation"], dropout=spec["dropout"], seed=spec["seed"])
    if len(input_shape) != 3:
        raise JobFileError(f"model.name = 'cnn' needs (height, width, channels) images, data has {input_shape}")
    sync = spec["sync_batchnorm"]
    return nn.cnn(tuple(spec["channels"]), spec["hidden"], classes, input_shape=tuple(input_shape),
                  seed=spec["seed"], batchnorm=spec["batchnorm"] or sync, sync_batchnorm=sync)


def build_loaders(job: dict, batch: int, rank: int, size: int):
    """(train loader, validation loader, image shape, classes) for the job's data section."""
    data, train = job["data"], job["train"]
    if data["name"] == "hdf5":
        from ..data import HDF5Loader

        loader = HDF5Loader(data["path"], batch, collective=data["collective"], prefetch=data["prefetch"],
                            seed=train["seed"], drop_last=train["drop_last"])
        val = HDF5Loader(data["val_path"], batch, collective=data["collective"], prefetch=data["prefetch"],
                         shuffle=False)
        classes = int(max(loader.labels.max(), val.labels.max())) + 1
        return loader, val, loader.image_shape, classes
    shape = tuple(data["shape"])
    images, labels = synthetic_classification(data["train_samples"], shape, data["classes"], data["seed"],
                                              data["noise"])
    val_images, val_labels = synthetic_classification(
        data["val_samples"], shape, data["classes"], data["seed"], data["noise"], start=data["train_samples"])
    sampler = DistributedSampler(len(images), rank, size, seed=train["seed"], drop_last=train["drop_last"])
    val_sampler = DistributedSampler(len(val_images), rank, size, shuffle=False)
    return (ArrayLoader(images, labels, batch, sampler), ArrayLoader(val_images, val_labels, batch, val_sampler),
            shape, data["classes"])


def build_optimizer(job: dict, model, steps_total: int):
    o, s = job["optimizer"], job["schedule"]
    base_lr = o["lr"]
    if s["scale_with_batch"]:
        base_lr = optim.linear_scaling(base_lr, job["train"]["global_batch"], s["reference_batch"])
    if s["name"] == "cosine":
        total = max(steps_total, s["warmup_steps"] + 1)
        lr = optim.warmup_cosine(base_lr, total, s["warmup_steps"], s["min_lr"])
    elif s["name"] == "step":
        lr = optim.warmup_step(base_lr, s["step_size"], s["gamma"], s["warmup_steps"])
    else:
        lr = optim.constant(base_lr)
    if o["name"] == "sgd":
        return optim.SGD(model, lr, momentum=o["momentum"], nesterov=o["nesterov"],
                         weight_decay=o["weight_decay"])
    return optim.Adam(model, lr, betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"],
                      decoupled=o["name"] == "adamw")


def limit_threads(ranks_on_host: int) -> None:
    """One BLAS/OpenMP pool of cores // ranks threads per rank, so ranks do not fight over cores,
    and never more threads than the cores this rank is bound to (mpirun binds a lone rank to one
    core: two spinning BLAS threads on it made a step 15x slower)."""
    from threadpoolctl import threadpool_limits

    bound = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threadpool_limits(max(1, min(bound, (os.cpu_count() or 1) // ranks_on_host)))


class Trainer:
    def __init__(self, job: dict, timeline_path: str = ""):
        self.job = job
        rt = runtime.init()
        self.comm = rt.world
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        limit_threads(rt.topology.host_ranks)
        train = job["train"]
        if train["global_batch"] % self.size:
            raise JobFileError(f"train.global_batch = {train['global_batch']} is not divisible by the "
                               f"{self.size} ranks of this job")
        self.batch = train["global_batch"] // self.size
        self.loader, self.val_loader, shape, classes = build_loaders(job, self.batch, self.rank, self.size)
        self.model = build_model(job["model"], shape, classes)
        self.steps_per_epoch = len(self.loader)
        if train["max_steps"]:
            self.steps_per_epoch = min(self.steps_per_epoch, train["max_steps"])
            if hasattr(self.loader, "max_batches"):  # collective readers must know where to stop
                self.loader.max_batches = self.steps_per_epoch
        self.total_steps = self.steps_per_epoch * train["epochs"]
        dist = job["distributed"]
        self.timeline = Timeline(bool(timeline_path), self.comm)
        self.timeline_path = timeline_path
        options = dict(bucket_mb=dist["bucket_mb"],
                       compression=None if dist["compression"] == "none" else dist["compression"],
                       backward_passes_per_step=dist["backward_passes_per_step"],
                       stall_warning_s=dist["stall_warning_s"], stall_abort_s=dist["stall_abort_s"],
                       timeline=self.timeline)
        base = build_optimizer(job, self.model, self.total_steps)
        ps = job["ps"]
        if ps["mode"]:
            from ..ps import ParameterServerOptimizer

            self.optimizer = ParameterServerOptimizer(
                self.model, base.schedule, ps["mode"], ps["staleness"], ps["tau"], ps["alpha"], ps["servers"],
                momentum=job["optimizer"]["momentum"], comm=self.comm, timeline=self.timeline,
                delay_s=ps["slow_by_s"] if self.rank == ps["slow_rank"] else 0.0)
        elif dist["zero_stage"]:
            self.optimizer = optim.ShardedOptimizer(base, self.model, stage=dist["zero_stage"], **options)
        elif uses_node_shared(job):
            self.optimizer = optim.NodeSharedOptimizer(base, self.model, **options)
        else:
            self.optimizer = optim.DistributedOptimizer(base, self.model, **options)
        self.loss = nn.SoftmaxCrossEntropy()
        self.watchdog = StallWatchdog(dist["stall_warning_s"], dist["stall_abort_s"])
        self.metrics = None
        if self.rank == 0 and job["log"]["metrics"]:
            path = Path(job["log"]["metrics"])
            path.parent.mkdir(parents=True, exist_ok=True)
            self.metrics = path.open("w")
        self.start_epoch = self.start_batch = self.start_step = 0
        self._resume()

    # -- checkpoints -------------------------------------------------------------------------------

    def _state_arrays(self) -> dict:
        """What a checkpoint holds: whole arrays by name, or under ZeRO this rank's slices of the flat ones."""
        if isinstance(self.optimizer, optim.ShardedOptimizer):
            shard, total = self.optimizer.shard, self.model.num_parameters()
            return {f"zero/{name}": checkpoint.Slab(a, shard.start, total)
                    for name, a in self.optimizer.shard_arrays().items()}
        arrays = {f"model/{name}": p.data for name, p in self.model.named_parameters().items()}
        arrays.update({f"optimizer/{name}": a for name, a in self.optimizer.optimizer.state_arrays().items()})
        return arrays

    def _layout(self) -> list | None:
        return self.optimizer.layout() if isinstance(self.optimizer, optim.ShardedOptimizer) else None

    def _rngs(self) -> list:
        """The generators that make training random beyond the data order (dropout masks)."""
        return [layer._rng for layer in getattr(self.model, "layers", []) if isinstance(layer, nn.Dropout)]

    def _checkpoint(self, epoch: int, next_batch: int, step: int) -> None:
        spec = self.job["checkpoint"]
        started = time.perf_counter()
        arrays = self._state_arrays()
        path = checkpoint.save(checkpoint.checkpoint_path(spec["directory"], step), arrays, {
            "step": step, "epoch": epoch, "next_batch": next_batch, "world_size": self.size,
            "optimizer_steps": self.optimizer.optimizer.steps, "job": self.job,
            "rng": [g.bit_generator.state for g in self._rngs()],
            **({"layout": self._layout()} if self._layout() else {})}, self.comm)
        seconds = time.perf_counter() - started
        nbytes = checkpoint.logical_bytes(arrays)
        checkpoint.prune(spec["directory"], spec["keep_last"], self.comm)
        self._emit({"type": "checkpoint", "step": step, "path": str(path), "bytes": nbytes, "seconds": seconds,
                    "write_gbps": nbytes / seconds / 1e9})

    def _resume(self) -> None:
        spec = self.job["checkpoint"]
        if not spec["resume"]:
            return
        if spec["resume"] == "auto":
            found = checkpoint.complete_checkpoints(spec["directory"])
            if not found:
                return  # nothing yet: a fresh start
            path = found[-1]
        else:
            path = Path(spec["resume"])
        current = self._state_arrays()
        started = time.perf_counter()
        slabs = {k: v for k, v in current.items() if isinstance(v, checkpoint.Slab)}
        arrays, attrs = checkpoint.load(
            path, self.comm, {k: (v.total,) if k in slabs else v.shape for k, v in current.items()},
            slices={k: (v.start, v.start + v.data.size) for k, v in slabs.items()}, layout=self._layout())
        for name, target in current.items():
            (target.data if name in slabs else target)[...] = arrays[name]
        self.comm.Barrier()  # node-shared parameters: every rank of a node wrote them
        if slabs:
            self.optimizer.shards_loaded()
        self.optimizer.optimizer.steps = attrs["optimizer_steps"]
        for generator, state in zip(self._rngs(), attrs["rng"], strict=True):
            generator.bit_generator.state = state
        self.start_epoch, self.start_batch, self.start_step = attrs["epoch"], attrs["next_batch"], attrs["step"]
        seconds = time.perf_counter() - started
        nbytes = checkpoint.logical_bytes(current)
        self._emit({"type": "resume", "path": str(path), "step": self.start_step,
                    "saved_by_ranks": attrs["world_size"], "bytes": nbytes, "seconds": seconds,
                    "read_gbps": nbytes / seconds / 1e9})

    def _emit(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, mean loss) over the whole validation set, every rank contributing its share."""
        self.model.eval()
        correct = total = loss_sum = 0.0
        with self._evaluated_parameters():
            for x, y in self.val_loader:
                self.watchdog.beat()
                logits = self.model(x)
                correct += float((logits.argmax(axis=1) == y).sum())
                loss_sum += float(self.loss.forward(logits, y)) * len(y)
                total += len(y)
        self.model.train()
        sums = allreduce(np.array([correct, loss_sum, total]), name="evaluate")
        return sums[0] / sums[2], sums[1] / sums[2]

    def _evaluated_parameters(self):
        """The parameters to evaluate: the model's, or under a parameter server the stored ones."""
        if self.ps:
            return self.optimizer.center_parameters()
        return contextlib.nullcontext()

    @property
    def ps(self) -> bool:
        return bool(self.job["ps"]["mode"])

    def _train_step(self, x, y, timings: dict) -> float:
        tl = self.timeline
        passes = self.optimizer.passes_per_step
        self.optimizer.zero_grad()
        loss_value = 0.0
        for xs, ys in zip(np.array_split(x, passes), np.array_split(y, passes), strict=True):
            t0 = time.perf_counter()
            with tl.span("forward", "compute"):
                loss_value += float(self.loss.forward(self.model(xs), ys)) / passes
            t1 = time.perf_counter()
            with tl.span("backward", "compute"):
                self.model.backward(self.loss.backward())
            t2 = time.perf_counter()
            timings["forward"] += t1 - t0
            timings["backward"] += t2 - t1
        t2 = time.perf_counter()
        with tl.span("optimizer step", "compute"):
            self.optimizer.step()
        timings["step"] += time.perf_counter() - t2
        timings["exposed"] += self.optimizer.exposed_s
        return loss_value

    def fit(self) -> dict:
        log_every = self.job["log"]["every_steps"]
        progress = None
        if self.rank == 0 and self.job["log"]["progress"]:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, unit="step", file=sys.stderr, mininterval=1.0,
                            dynamic_ncols=True, disable=None)
        self.watchdog.start()
        totals = dict.fromkeys(("data", "forward", "backward", "step", "exposed"), 0.0)
        step, started, val_acc, val_loss = self.start_step, time.perf_counter(), 0.0, 0.0
        every = self.job["checkpoint"]["every_steps"]
        if progress is not None:
            progress.update(step)
        for epoch in range(self.start_epoch, self.job["train"]["epochs"]):
            self.loader.set_epoch(epoch)
            epoch_times = dict.fromkeys(totals, 0.0)
            batches = iter(self.loader)
            first = self.start_batch if epoch == self.start_epoch else 0
            for _ in range(first):  # resumed mid-epoch: the same order, the done part skipped
                next(batches)
            losses = []
            for index in range(first, self.steps_per_epoch):
                t0 = time.perf_counter()
                with self.timeline.span("data wait", "data"):
                    x, y = next(batches)
                epoch_times["data"] += time.perf_counter() - t0
                losses.append(self._train_step(x, y, epoch_times))
                self.watchdog.beat()
                step += 1
                if step % log_every == 0 or step == self.total_steps:
                    self._log_step(epoch, step, losses, epoch_times, progress)
                if every and step % every == 0:
                    self._checkpoint(epoch, index + 1, step)
            val_acc, val_loss = self.evaluate()
            for k in totals:
                totals[k] += epoch_times[k]
            step_time = max(sum(epoch_times[k] for k in ("data", "forward", "backward", "step")), 1e-9)
            record = {"type": "epoch", "epoch": epoch, "step": step,
                      "train_loss": float(np.mean(losses)) if losses else None,
                      "val_accuracy": val_acc, "val_loss": val_loss,
                      "samples_per_s": len(losses) * self.batch * self.size / step_time,
                      "exposed_comm_fraction": epoch_times["exposed"] / step_time,
                      "elapsed_s": time.perf_counter() - started}
            if self.ps:
                record["staleness"] = staleness_summary(self.optimizer.staleness[-len(losses):])
            self._emit(record)
            if progress is not None:
                progress.write(f"epoch {epoch}: val accuracy {val_acc:.4f}, val loss {val_loss:.4f}, "
                               f"{record['samples_per_s']:.0f} samples/s")
        if progress is not None:
            progress.close()
        self.watchdog.stop()
        if self.ps:
            summary_staleness = staleness_summary(self.optimizer.staleness)
            self.optimizer.close()
        step_time = max(sum(totals[k] for k in ("data", "forward", "backward", "step")), 1e-9)
        ran = max(step - self.start_step, 1)  # steps this run executed (a resumed run starts later)
        summary = {"type": "summary", "val_accuracy": val_acc, "val_loss": val_loss, "steps": step,
                   "epochs": self.job["train"]["epochs"], "ranks": self.size,
                   "parameters": self.model.num_parameters(),
                   "samples_per_s": ran * self.batch * self.size / step_time,
                   "step_ms": 1e3 * step_time / ran,
                   "exposed_comm_fraction": totals["exposed"] / step_time,
                   "split_ms": {k: 1e3 * v / ran for k, v in totals.items()},
                   "elapsed_s": time.perf_counter() - started}
        if self.ps:
            summary.update(ps_mode=self.job["ps"]["mode"], staleness=summary_staleness)
        self._emit(summary)
        if self.metrics is not None:
            self.metrics.close()
        if self.timeline_path:
            self.timeline.write(self.timeline_path, self.comm)
        for loader in (self.loader, self.val_loader):
            if hasattr(loader, "close"):
                loader.close()
        return summary

    def _log_step(self, epoch, step, losses, times, progress) -> None:
        window = losses[-self.job["log"]["every_steps"]:]
        extra = {}
        if self.ps:  # workers run at their own pace: no collective here, rank 0's own loss
            loss = float(np.mean(window))
            extra["staleness"] = staleness_summary(self.optimizer.staleness[-len(window):])
        else:
            loss = float(allreduce(np.array([np.mean(window)]), op="mean", name="loss")[0])
        done = sum(times[k] for k in ("data", "forward", "backward", "step"))
        steps_done = len(losses)
        rate = steps_done * self.batch * self.size / done if done else 0.0
        self._emit({"type": "step", "epoch": epoch, "step": step, "loss": loss, "lr": self.optimizer.lr,
                    "samples_per_s": rate, "step_ms": 1e3 * done / steps_done,
                    "exposed_comm_ms": 1e3 * times["exposed"] / steps_done,
                    "data_ms": 1e3 * times["data"] / steps_done, **extra})
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.0f}", refresh=False)
            progress.update(step - progress.n)


def summary_line(summary: dict) -> str:
    return (f"hpc-train train: final val accuracy {summary['val_accuracy']:.4f} | "
            f"{summary['samples_per_s']:.0f} samples/s on {summary['ranks']} ranks | exposed communication "
            f"{100 * summary['exposed_comm_fraction']:.1f}% of step time | {summary['steps']} steps in "
            f"{summary['elapsed_s']:.1f} s")

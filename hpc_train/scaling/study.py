"""Scaling studies: run a training job at several rank counts, time-boxed and repeated, and keep medians.

A study file (jobs/scaling/*.toml) names the base job, strong or weak scaling, the
rank counts and the repeats. Each run is `hpc-train train` under mpirun (or srun
inside a Slurm allocation) with the batch set for its rank count and a fixed
number of steps; its per-step metrics give the steady-state step time (the first
`warmup_steps` excluded) and its split into compute, exposed communication and
data wait. Repeats are interleaved across rank counts so that drift on a shared
machine hits all of them alike. A run that fails or outlives `timeout_s` is
recorded with its log and the study goes on. A preemption signal ends the study after
the run it interrupts (which is discarded); `--resume` continues from the runs recorded.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import launchers, preemption
from ..errors import JobFileError
from ..train import config
from ..train.metrics import read_run

MODES = ("strong", "weak")
LAUNCHERS = ("auto", "mpirun", "srun")
# key: (type, default); REQUIRED keys have no default
STUDY_KEYS = {
    "job": (str, config.REQUIRED),
    "mode": (str, config.REQUIRED),
    "ranks": (list, config.REQUIRED),
    "repeats": (int, 3),
    "steps": (int, 20),
    "warmup_steps": (int, 5),
    "timeout_s": ((int, float), 300),
    "per_rank_batch": (int, 0),  # weak: the batch of every rank (0: the job's global batch)
    "global_batch": (int, 0),  # strong: the batch shared by all ranks (0: the job's)
    "set": (list, []),  # extra --set overrides for every run
    "launcher": (str, "auto"),
    "ranks_per_node": (int, 0),  # pretend nodes of this many ranks (0: one node)
    "cores_per_node": (int, 0),  # 0: this machine's cores
    "bench": (list, ["auto"]),  # bench JSON files for the model; "auto": measure one first
    "link": (str, ""),  # network between nodes for predictions beyond one node
    "predict_ranks": (list, []),
    "nodes_of": (int, 8),  # node shape of predict_ranks
}


@dataclass
class Study:
    path: Path
    job: Path
    mode: str
    ranks: list[int]
    repeats: int = 3
    steps: int = 20
    warmup_steps: int = 5
    timeout_s: float = 300
    per_rank_batch: int = 0
    global_batch: int = 0
    set: list = field(default_factory=list)
    launcher: str = "auto"
    ranks_per_node: int = 0
    cores_per_node: int = 0
    bench: list = field(default_factory=lambda: ["auto"])
    link: str = ""
    predict_ranks: list = field(default_factory=list)
    nodes_of: int = 8
    base_job: dict = field(default_factory=dict)

    def batch(self, ranks: int) -> tuple[int, int]:
        """(global batch, per-rank batch) at this rank count."""
        if self.mode == "weak":
            return self.per_rank_batch * ranks, self.per_rank_batch
        return self.global_batch, self.global_batch // ranks


def load_study(path, overrides: dict | None = None) -> Study:
    """Parse and check a study file (JobFileError naming the file and key); the job is validated too."""
    path = Path(path)
    raw = config.read_toml(path, "study file")
    if set(raw) != {"study"}:
        raise JobFileError(f"{path}: a study file holds one [study] table, found {sorted(raw) or 'nothing'}")
    return study_from_table({**raw["study"], **(overrides or {})}, path)


def study_from_table(given: dict, path: Path) -> Study:
    """A checked Study from [study] keys; `job` is relative to the study file's folder."""
    values = {}
    for key in given:
        if key not in STUDY_KEYS:
            raise JobFileError(f"{path}: unknown key 'study.{key}'{config.suggest(key, STUDY_KEYS)}")
    for key, (kind, default) in STUDY_KEYS.items():
        if key not in given:
            if default is config.REQUIRED:
                raise JobFileError(f"{path}: missing required key 'study.{key}'")
            values[key] = list(default) if isinstance(default, list) else default
            continue
        value = given[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise JobFileError(f"{path}: 'study.{key}' must be {config.type_name(kind)}, got {value!r}")
        values[key] = value
    if values["mode"] not in MODES:
        raise JobFileError(f"{path}: 'study.mode' = {values['mode']!r}: expected one of {MODES}")
    if values["launcher"] not in LAUNCHERS:
        raise JobFileError(f"{path}: 'study.launcher' = {values['launcher']!r}: expected one of {LAUNCHERS}")
    ranks = values["ranks"]
    if not ranks or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise JobFileError(f"{path}: 'study.ranks' must be a list of positive integers, got {ranks!r}")
    values["ranks"] = sorted(set(ranks))
    for key in ("repeats", "steps"):
        if values[key] <= 0:
            raise JobFileError(f"{path}: 'study.{key}' must be positive, got {values[key]}")
    job_path = (path.parent / values["job"]).resolve()
    base = config.load(job_path, values["set"])
    study = Study(path=path, **{**values, "job": job_path}, base_job=base)
    if study.mode == "weak" and not study.per_rank_batch:
        study.per_rank_batch = base.train.global_batch
    if study.mode == "strong" and not study.global_batch:
        study.global_batch = base.train.global_batch
    return study


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launch_prefix(study: Study, ranks: int) -> list[str]:
    """srun job steps inside an allocation (where Slurm offers pmix), mpirun otherwise."""
    launcher = study.launcher
    if launcher == "auto":
        launcher = launchers.preferred()
    if launcher == "srun":
        over = ["--overcommit"] if ranks > int(os.environ.get("SLURM_NTASKS", ranks)) else []
        return ["srun", "-n", str(ranks), "--mpi=pmix", "--kill-on-bad-exit=1", *over]
    return ["mpirun", "-n", str(ranks)]


def child_environment(study: Study, ranks: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "OMPI_MCA_ess"))}
    if os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    if ranks > (study.cores_per_node or cores()):
        env["OMPI_MCA_rmaps_base_oversubscribe"] = "true"
        env["OMPI_MCA_mpi_yield_when_idle"] = "1"
    if study.ranks_per_node:
        env["HPC_TRAIN_RANKS_PER_NODE"] = str(study.ranks_per_node)
    return env


def run_overrides(study: Study, ranks: int, metrics: Path) -> list[str]:
    global_batch, _ = study.batch(ranks)
    steps = study.warmup_steps + study.steps
    sets = [f"train.global_batch={global_batch}", "train.epochs=1", f"train.steps_per_epoch={steps}",
            "train.max_steps=0", "log.every_steps=1", "log.progress=false", "checkpoint.every_steps=0",
            "checkpoint.resume=", f"log.metrics={metrics}"]
    if study.base_job.data.name == "synthetic":
        sets += [f"data.train_samples={max(study.base_job.data.train_samples, global_batch * steps)}",
                 f"data.val_samples={max(ranks, min(study.base_job.data.val_samples, global_batch))}"]
    return [*study.set, *sets]


def steady_state(metrics: Path, warmup: int) -> dict:
    """Per-step means over the steps after `warmup`, from the cumulative step records of epoch 0."""
    records = read_run(metrics)
    steps = [r for r in records if r["type"] == "step" and r["epoch"] == 0]
    if not steps:
        raise ValueError(f"{metrics}: no step records")
    last = steps[-1]
    first = next((r for r in steps if r["step"] == warmup), None) if warmup else None
    n_b, n_a = last["step"], first["step"] if first else 0

    def window(key):
        total_b = last[key] * n_b
        total_a = first[key] * n_a if first else 0.0
        return (total_b - total_a) / (n_b - n_a)

    step, exposed, data = window("step_ms"), window("exposed_comm_ms"), window("data_ms")
    summary = next((r for r in records if r["type"] == "summary"), {})
    split = summary.get("split_ms", {})
    work = split.get("forward", 0.0) + split.get("backward", 0.0) + split.get("step", 0.0) - split.get("exposed", 0.0)
    # the optimizer step without its waits, over the same steps as compute_ms: a slow first step (first
    # touch of the buffers) averaged in would make the update look longer than all the compute
    update = window("optimizer_ms") - exposed if "optimizer_ms" in last else split.get("step", 0.0) - split.get(
        "exposed", 0.0)
    return {"step_ms": step, "exposed_ms": exposed, "data_ms": data, "compute_ms": step - exposed - data,
            "steps_timed": n_b - n_a, "parameters": summary.get("parameters"),
            "backward_fraction": split["backward"] / work if work > 0 else None,
            "update_ms": min(max(0.0, update), step - exposed - data)}


def run_one(study: Study, ranks: int, repeat: int, out: Path, python: str = sys.executable) -> dict:
    """One time-boxed run; its record says ok, failed (with the exit code), timed out, or preempted
    (a watched signal arrived: the run is killed, its partial figures are worth nothing), and where the log is."""
    folder = out / "runs" / f"ranks{ranks}-repeat{repeat}"
    folder.mkdir(parents=True, exist_ok=True)
    metrics, log = folder / "metrics.jsonl", folder / "log.txt"
    command = [*launch_prefix(study, ranks), python, "-m", "hpc_train.cli", "train", str(study.job)]
    for s in run_overrides(study, ranks, metrics):
        command += ["--set", s]
    record = {"ranks": ranks, "repeat": repeat, "log": str(log), "command": command}
    started = time.monotonic()
    with log.open("w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=child_environment(study, ranks),
                                start_new_session=True)
        while (rc := proc.poll()) is None:
            if preemption.received() or time.monotonic() - started > study.timeout_s:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if preemption.received():
                    return {**record, "status": "preempted"}
                return {**record, "status": "timed out", "detail": f"killed after {study.timeout_s:g} s"}
            time.sleep(0.05)
    record["wall_s"] = time.monotonic() - started
    if rc != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or [""]
        record.update(status="failed", detail=f"exit code {rc}: {tail[0][:200]}")
        return record
    try:
        record.update(status="ok", **steady_state(metrics, study.warmup_steps))
    except (OSError, ValueError, KeyError) as exc:
        record.update(status="failed", detail=f"unreadable metrics: {exc}")
    return record


def run_study(study: Study, out: Path, progress=print, resume: bool = False) -> list[dict]:
    """Every rank count `repeats` times, interleaved (a fresh order each round); all run records.

    Each finished run's record is appended to out/runs.jsonl as it ends; with `resume`, the runs
    recorded there are kept instead of run again (a study requeued after a preemption goes on).
    Stops early, with the records so far, once a watched preemption signal has arrived."""
    import random

    journal = out / "runs.jsonl"
    done = {}
    if resume and journal.exists():
        for line in journal.read_text().splitlines():
            record = json.loads(line)
            done[record["ranks"], record["repeat"]] = record
    records = []
    with journal.open("a" if resume else "w") as sink:
        for repeat in range(study.repeats):
            order = list(study.ranks)
            random.Random(repeat).shuffle(order)
            for ranks in order:
                if (ranks, repeat) in done:
                    progress(f"ranks {ranks:>4} repeat {repeat}: kept from an earlier attempt")
                    records.append(done[ranks, repeat])
                    continue
                record = run_one(study, ranks, repeat, out)
                if record["status"] == "preempted":
                    return records
                progress(f"ranks {ranks:>4} repeat {repeat}: {record['status']}"
                         + (f" {record['step_ms']:.2f} ms/step" if record["status"] == "ok" else
                            f" ({record['detail']}; log {record['log']})"))
                records.append(record)
                sink.write(json.dumps(record) + "\n")
                sink.flush()
    return records


def summarize(study: Study, records: list[dict]) -> list[dict]:
    """Per rank count: medians of the successful repeats, or why none succeeded."""
    rows = []
    for ranks in study.ranks:
        mine = [r for r in records if r["ranks"] == ranks]
        ok = [r for r in mine if r["status"] == "ok"]
        global_batch, per_rank = study.batch(ranks)
        row = {"ranks": ranks, "global_batch": global_batch, "per_rank_batch": per_rank,
               "repeats_ok": len(ok), "repeats": len(mine),
               "oversubscribed": ranks > (study.cores_per_node or cores())}
        if not ok:
            worst = mine[0] if mine else {"status": "not run", "detail": "", "log": ""}
            row.update(status=worst["status"], detail=worst.get("detail", ""), log=worst.get("log", ""))
        else:
            row["status"] = "ok" if len(ok) == len(mine) else f"ok ({len(mine) - len(ok)} repeat(s) failed)"
            for key in ("step_ms", "compute_ms", "exposed_ms", "data_ms"):
                row[key] = statistics.median(r[key] for r in ok)
            for key in ("backward_fraction", "update_ms"):  # absent from older records
                values = [r[key] for r in ok if r.get(key) is not None]
                row[key] = statistics.median(values) if values else None
            row["samples_per_s"] = global_batch / (row["step_ms"] / 1e3)
        rows.append(row)
    base = next((r for r in rows if "step_ms" in r), None)
    for row in rows:
        if "step_ms" in row and base is not None:
            if study.mode == "strong":  # same work: time ratio
                row["speedup"] = base["step_ms"] / row["step_ms"] * base["ranks"]
            else:  # same work per rank: throughput ratio
                row["speedup"] = row["samples_per_s"] / base["samples_per_s"] * base["ranks"]
            row["efficiency"] = row["speedup"] / row["ranks"]
    return rows

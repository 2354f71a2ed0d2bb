"""Preemption under mpirun (serial tests): a signal in the middle of training gives a checkpoint
and exit code 75 on every rank, and the resumed run continues bit for bit.

The witness of "every rank stopped at the same step" is independent of the stop logic: a run
that resumes from the checkpoint reproduces an uninterrupted run's per-step losses exactly, and
a library program's ranks each print where they stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from hpc_train import checkpoint, preemption

from .conftest import ROOT, clean_environment, python_cmd, rank_pids, run_mpi

LONG_JOB = """
[model]
name = "mlp"
widths = [3072, 256, 10]
[data]
train_samples = 2400
val_samples = 240
[train]
epochs = 1000
max_steps = {max_steps}
global_batch = 48
[checkpoint]
directory = "{directory}"
[log]
every_steps = 1
progress = false
metrics = "{metrics}"
"""


def write_job(tmp_path: Path, name: str, max_steps: int) -> Path:
    job = tmp_path / f"{name}.toml"
    job.write_text(LONG_JOB.format(max_steps=max_steps, directory=tmp_path / f"{name}-ckpt",
                                   metrics=tmp_path / f"{name}.jsonl"))
    return job


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def step_losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(path) if r["type"] == "step"}


def run_and_signal(nranks: int, args: list[str], metrics: Path, signum: int, target: str, after_steps: int = 20,
                   env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """mpirun ARGS; once `after_steps` step records are in `metrics`, send `signum` to mpirun
    (target "mpirun"), to one rank alone ("one rank") or to mpirun and every rank ("job");
    wait for the end, time-boxed."""
    proc = subprocess.Popen(["mpirun", "-n", str(nranks), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**clean_environment(), **(env or {})}, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not (metrics.exists() and metrics.read_text().count('"type": "step"') >= after_steps):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was signalled"
            time.sleep(0.05)
        if target == "mpirun":
            os.kill(proc.pid, signum)
        elif target == "job":
            os.killpg(proc.pid, signum)
        else:
            ranks = rank_pids(proc.pid)
            assert len(ranks) == nranks, ranks
            os.kill(ranks[-1], signum)
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(("nranks", "target"), [(2, "mpirun"), (3, "one rank")])
def test_usr1_checkpoints_exits_75_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, nranks, target):
    job, reference = write_job(tmp_path, "run", 600), write_job(tmp_path, "reference", 600)
    metrics = tmp_path / "run.jsonl"
    train = python_cmd("-m", "hpc_train.cli", "train", str(job))
    proc = run_and_signal(nranks, train, metrics, signal.SIGUSR1, target, env={"HPC_TRAIN_PREEMPT_GRACE_S": "1e-6"})
    assert proc.returncode == preemption.EXIT_PREEMPTED, proc.stderr
    stop = records(metrics)[-1]
    assert stop["type"] == "preempted" and stop["signal"] == "SIGUSR1" and stop["exit_code"] == 75
    assert 20 <= stop["step"] < 600
    assert [Path(stop["checkpoint"])] == checkpoint.complete_checkpoints(tmp_path / "run-ckpt")
    assert "stopped by SIGUSR1 at step" in proc.stdout and "exit code 75" in proc.stdout
    assert "more than the 1e-06 s it had before being killed" in proc.stderr  # the grace the signal left

    resumed = run_mpi(nranks, [*train, "--set", "checkpoint.resume=auto"], timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    uninterrupted = run_mpi(nranks, python_cmd("-m", "hpc_train.cli", "train", str(reference)), timeout=180)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    expected = step_losses(tmp_path / "reference.jsonl")
    assert sorted(expected) == list(range(1, 601))
    assert step_losses(metrics) == expected  # every step once, bit for bit: ranks stopped at the same step
    run = records(metrics)
    assert len({r["run_id"] for r in run}) == 1 and {r["attempt"] for r in run} == {0, 1}
    assert [r["type"] for r in run].count("summary") == 1 and run[-1]["type"] == "summary"


def test_sigterm_to_mpirun_checkpoints_within_the_raised_kill_grace(tmp_path):
    job = write_job(tmp_path, "run", 100_000)
    metrics = tmp_path / "run.jsonl"
    started = time.monotonic()
    proc = run_and_signal(2, python_cmd("-m", "hpc_train.cli", "train", str(job)), metrics, signal.SIGTERM,
                          "mpirun", env={"OMPI_MCA_odls_base_sigkill_timeout": "4"})
    assert time.monotonic() - started < 120
    assert proc.returncode != 0  # mpirun was told to terminate: it reports its own failure, not the ranks' 75
    stop = records(metrics)[-1]
    assert stop["type"] == "preempted" and stop["signal"] == "SIGTERM" and stop["grace_s"] == 4.0, stop
    assert stop["step"] < 100_000 and stop["exit_code"] == 75
    assert [Path(stop["checkpoint"])] == checkpoint.complete_checkpoints(tmp_path / "run-ckpt")


def test_parameter_server_modes_stop_on_the_signal_and_say_they_did_not_checkpoint(tmp_path):
    job = write_job(tmp_path, "run", 100_000)
    metrics = tmp_path / "run.jsonl"
    proc = run_and_signal(3, python_cmd("-m", "hpc_train.cli", "train", str(job), "--set", "ps.mode=ssp",
                                        "--set", "train.global_batch=48"), metrics, signal.SIGUSR1, "one rank")
    assert proc.returncode == 128 + signal.SIGUSR1, proc.stderr  # not 75: there is nothing to resume from
    stop = records(metrics)[-1]
    assert stop["type"] == "preempted" and stop["checkpoint"] is None and stop["step"] < 100_000
    assert "this strategy cannot checkpoint, nothing to resume from" in proc.stdout
    assert not (tmp_path / "run-ckpt").exists()


LIBRARY_PROGRAM = """
import sys, time, numpy as np, hpc_train as ht
ht.init(); ht.preemption.watch()
ready = sys.argv[1]
for step in range(100_000):
    ht.allreduce(np.ones(1000), op="sum")
    time.sleep(0.002)
    if step == 30 and ht.rank() == 0:
        open(ready, "w").close()
    if ht.preempted():
        break
print(f"rank {ht.rank()} stopped after step {step}", flush=True)
"""


def test_library_programs_agree_on_the_step_to_stop_at(tmp_path):
    program, ready = tmp_path / "loop.py", tmp_path / "ready"
    program.write_text(LIBRARY_PROGRAM)
    proc = subprocess.Popen(["mpirun", "-n", "3", *python_cmd(str(program), str(ready))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_environment(), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        ranks = rank_pids(proc.pid)
        os.kill(ranks[1], signal.SIGUSR1)  # one rank of three
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    stops = {line.split()[-1] for line in out.splitlines() if "stopped after step" in line}
    assert out.count("stopped after step") == 3 and len(stops) == 1, out
    assert 30 <= int(stops.pop()) < 99_999


@pytest.mark.parametrize(("name", "number"), [("SIGUSR1", signal.SIGUSR1), ("usr2", signal.SIGUSR2),
                                              ("15", signal.SIGTERM)])
def test_signal_names(name, number):
    assert preemption.signal_number(name) == number


@pytest.mark.parametrize("name", ["SIGKILL", "STOP", "SIGFOO", "0"])
def test_signals_that_cannot_be_watched_are_refused(name):
    with pytest.raises(ValueError, match=repr(name)):
        preemption.signal_number(name)


def test_tensorboard_shows_a_crashed_and_resumed_run_as_one(tmp_path):
    """A crash after a periodic checkpoint makes the resumed run redo steps: TensorBoard, like the
    metrics readers, must keep each step once, from the latest attempt."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job, reference = write_job(tmp_path, "run", 120), write_job(tmp_path, "reference", 120)
    board = tmp_path / "board"
    train = python_cmd("-m", "hpc_train.cli", "train", str(job), "--set", "checkpoint.every_steps=30",
                       "--set", f"log.tensorboard={board}")
    metrics = tmp_path / "run.jsonl"
    crashed = run_and_signal(2, train, metrics, signal.SIGKILL, "job", after_steps=45)
    assert crashed.returncode != 0
    last = max(r["step"] for r in records(metrics) if r["type"] == "step")
    assert 45 <= last < 120  # killed mid-run: past the checkpoint of step 30 (perhaps of 60), steps to redo
    resumed = run_mpi(2, [*train, "--set", "checkpoint.resume=auto"], timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert run_mpi(2, python_cmd("-m", "hpc_train.cli", "train", str(reference)), timeout=180).returncode == 0

    events = EventAccumulator(str(board))
    events.Reload()
    loss = events.Scalars("step/loss")
    expected = step_losses(tmp_path / "reference.jsonl")
    assert [e.step for e in loss] == list(range(1, 121))  # steps 31-45+ once, not twice
    assert [e.value for e in loss] == [float(np.float32(expected[s])) for s in range(1, 121)]
    assert {"epoch/val_accuracy", "step/samples_per_s", "step/lr"} <= set(events.Tags()["scalars"])

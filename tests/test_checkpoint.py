"""Checkpoints through `hpc-train train`: bit-for-bit resume, re-sharding, kill -9, bad files (serial tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import h5py
import pytest

from hpc_train import checkpoint

from .conftest import ROOT, clean_environment, python_cmd, run_mpi

JOB = """
[model]
name = "mlp"
widths = [3072, {hidden}, 10]
dropout = {dropout}
[data]
train_samples = 1280
val_samples = 256
[optimizer]
name = "adam"
lr = 0.001
[train]
epochs = 2
global_batch = 64
[distributed]
zero_stage = {stage}
bucket_mb = 0.1
[checkpoint]
every_steps = 4
keep_last = 2
directory = "{directory}"
[log]
every_steps = 1
progress = false
"""


def write_job(tmp_path, name="job.toml", hidden=64, dropout=0.1, directory="ckpt", stage=0):
    path = tmp_path / name
    path.write_text(JOB.format(hidden=hidden, dropout=dropout, directory=tmp_path / directory, stage=stage))
    return path


def train(ranks, job, metrics, *sets, timeout=300):
    args = python_cmd("-m", "hpc_train.cli", "train", str(job), "--metrics", str(metrics))
    for s in sets:
        args += ["--set", s]
    return run_mpi(ranks, args, timeout=timeout)


def losses(metrics):
    return {r["step"]: r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r["type"] == "step"}


@pytest.mark.parametrize("stage", [0, 1, 2, 3], ids=lambda s: f"zero{s}")
def test_resume_is_bit_for_bit(tmp_path, stage):
    job = write_job(tmp_path, stage=stage)
    assert train(2, job, tmp_path / "a.jsonl", f"checkpoint.directory={tmp_path / 'a'}").returncode == 0
    first = train(2, job, tmp_path / "b1.jsonl", "train.epochs=1")
    assert first.returncode == 0, first.stderr
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "ckpt")] == [
        "ckpt-000000016.h5", "ckpt-000000020.h5"]  # keep_last = 2
    second = train(2, job, tmp_path / "b2.jsonl", "checkpoint.resume=auto")
    assert second.returncode == 0, second.stderr
    uninterrupted, resumed = losses(tmp_path / "a.jsonl"), losses(tmp_path / "b2.jsonl")
    assert sorted(resumed) == list(range(21, 41))
    assert all(resumed[k] == uninterrupted[k] for k in resumed)  # equal to the last bit
    records = [json.loads(line) for line in (tmp_path / "b2.jsonl").read_text().splitlines()]
    resume = next(r for r in records if r["type"] == "resume")
    assert resume["step"] == 20 and resume["read_gbps"] > 0
    assert any(r["type"] == "checkpoint" and r["write_gbps"] > 0 for r in records)


def test_a_resumed_run_appends_to_its_metrics_as_the_same_run(tmp_path):
    job, metrics = write_job(tmp_path), tmp_path / "m.jsonl"
    assert train(2, job, metrics, "train.epochs=1").returncode == 0  # stops at step 20, checkpointed there
    second = train(2, job, metrics, "checkpoint.resume=auto")
    assert second.returncode == 0, second.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len({r["run_id"] for r in records}) == 1
    assert [r["attempt"] for r in records] == sorted(r["attempt"] for r in records)
    assert {r["attempt"] for r in records} == {0, 1}
    assert [r["step"] for r in records if r["type"] == "step"] == list(range(1, 41))  # one continuous history
    assert [r["type"] for r in records].count("summary") == 2
    fresh = train(2, job, metrics, "train.epochs=1", f"checkpoint.directory={tmp_path / 'other'}")
    assert fresh.returncode == 0
    again = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert again[0]["step"] == 1 and {r["attempt"] for r in again} == {0}  # a new run starts its own file
    assert again[0]["run_id"] != records[0]["run_id"]


@pytest.mark.parametrize("stage", [0, 2, 3], ids=lambda s: f"zero{s}")
@pytest.mark.parametrize("before, after", [(2, 4), (4, 2)])
def test_resume_with_another_rank_count(tmp_path, before, after, stage):
    job = write_job(tmp_path, dropout=0.0, stage=stage)
    assert train(after, job, tmp_path / "a.jsonl", f"checkpoint.directory={tmp_path / 'a'}").returncode == 0
    assert train(before, job, tmp_path / "b1.jsonl", "train.epochs=1").returncode == 0
    proc = train(after, job, tmp_path / "b2.jsonl", "checkpoint.resume=auto")
    assert proc.returncode == 0, proc.stderr
    uninterrupted, resumed = losses(tmp_path / "a.jsonl"), losses(tmp_path / "b2.jsonl")
    assert sorted(resumed) == list(range(21, 41))
    for step, value in resumed.items():
        assert value == pytest.approx(uninterrupted[step], rel=1e-4), step


def kill_9_during_a_checkpoint_write(job, directory):
    """Train `job` on 2 ranks with a checkpoint every step, kill -9 the whole job while a write is in
    progress after one has completed; the newest complete checkpoint's (arrays, attrs)."""
    command = ["mpirun", "-n", "2", *python_cmd("-m", "hpc_train.cli", "train", str(job),
                                                "--set", "checkpoint.every_steps=1", "--set", "train.epochs=20",
                                                "--set", "checkpoint.keep_last=50")]
    proc = subprocess.Popen(command, env=clean_environment(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # wait for a finished checkpoint and a write in progress
            if checkpoint.complete_checkpoints(directory) and list(directory.glob("*.partial")):
                break
            time.sleep(0.01)
        else:
            pytest.fail("no checkpoint write was caught in progress")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    from mpi4py import MPI

    return checkpoint.load(checkpoint.complete_checkpoints(directory)[-1], MPI.COMM_SELF)


def test_kill_9_during_a_write_leaves_the_previous_checkpoint_intact(tmp_path):
    job = write_job(tmp_path, hidden=2048, dropout=0.0)  # 25 MB a checkpoint: writes take a while
    arrays, attrs = kill_9_during_a_checkpoint_write(job, tmp_path / "ckpt")
    assert arrays["model/1.weight"].shape == (3072, 2048) and attrs["step"] >= 1
    resumed = train(2, job, tmp_path / "r.jsonl", "checkpoint.resume=auto", "train.epochs=1")
    assert resumed.returncode == 0, resumed.stderr


def test_bad_checkpoints_are_named_on_every_rank(tmp_path):
    job = write_job(tmp_path)
    assert train(2, job, tmp_path / "a.jsonl", "train.epochs=1").returncode == 0
    good = checkpoint.complete_checkpoints(tmp_path / "ckpt")[-1]
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2, 3]
    cases = {truncated: "unreadable checkpoint", foreign: "not an hpc_train checkpoint"}
    for path, message in cases.items():
        proc = train(2, job, tmp_path / "x.jsonl", f"checkpoint.resume={path}")
        assert proc.returncode != 0 and proc.stderr.count(message) == 2, proc.stderr
    other = write_job(tmp_path, "other.toml", hidden=32)
    proc = train(2, other, tmp_path / "y.jsonl", f"checkpoint.resume={good}")
    assert proc.returncode != 0
    message = "array 'model/1.weight' has shape (3072, 64) in the checkpoint, (3072, 32) in the job"
    assert proc.stderr.count(message) == 2, proc.stderr
    proc = train(2, job, tmp_path / "z.jsonl", f"checkpoint.resume={good}", "distributed.zero_stage=3")
    assert proc.returncode != 0 and proc.stderr.count("written by a data-parallel job") == 2, proc.stderr


def test_bad_sharded_checkpoint_names_the_parameter(tmp_path):
    job = write_job(tmp_path, stage=3)
    assert train(2, job, tmp_path / "a.jsonl", "train.epochs=1").returncode == 0
    good = checkpoint.complete_checkpoints(tmp_path / "ckpt")[-1]
    other = write_job(tmp_path, "other.toml", hidden=32, stage=2)
    proc = train(2, other, tmp_path / "y.jsonl", f"checkpoint.resume={good}")
    message = "parameter '4.weight' (64, 10) in the checkpoint where the job has '4.weight' (32, 10)"
    assert proc.returncode != 0 and proc.stderr.count(message) == 2, proc.stderr

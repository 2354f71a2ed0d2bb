"""`hpc-train train` as a user runs it: through our own mpirun (serial tests)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from .conftest import ROOT, clean_environment, python_cmd, run_mpi

SMALL_JOB = """
[model]
name = "mlp"
widths = [3072, 64, 10]
[data]
train_samples = 1200
val_samples = 400
[optimizer]
lr = 0.02
[train]
epochs = 2
global_batch = 64
[distributed]
bucket_mb = 0.1
compression = "fp16"
[log]
every_steps = 5
progress = false
"""

STALL = """
import time, numpy as np, hpc_train as ht
from hpc_train import nn, optim
ht.init()
model = nn.mlp((8, 4))
dist = optim.DistributedOptimizer(optim.SGD(model, lr=0.1), model, stall_warning_s=1, stall_abort_s=4)
if ht.rank() == 1:
    time.sleep(60)  # never runs backward: its buckets are never submitted
out = model(np.ones((2, 8), np.float32))
model.backward(np.ones_like(out))
dist.step()
"""


def test_train_small_job_writes_metrics_and_timeline(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(SMALL_JOB)
    metrics, trace = tmp_path / "m.jsonl", tmp_path / "trace.json"
    proc = run_mpi(2, python_cmd("-m", "hpc_train.cli", "train", str(job), "--metrics", str(metrics),
                                 "--timeline", str(trace), "--set", "train.epochs=1"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("hpc-train train: final val accuracy") == 1  # rank 0 alone
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["type"] for r in records].count("epoch") == 1  # --set overrode epochs = 2
    summary = records[-1]
    assert summary["type"] == "summary" and summary["ranks"] == 2
    assert summary["val_accuracy"] > 0.5 and 0 <= summary["exposed_comm_fraction"] < 1
    events = json.loads(trace.read_text())["traceEvents"]
    names = {(e["pid"], e["name"].split(" bucket")[0]) for e in events if e["ph"] == "X"}
    for pid in (0, 1):
        for name in ("forward", "backward", "pack", "allreduce", "unpack", "optimizer step", "data wait"):
            assert (pid, name) in names, (pid, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml", "m.jsonl", "trace.json"]  # parts removed


def test_a_killed_run_leaves_a_readable_trace_of_every_rank(tmp_path):
    """The timeline is flushed as the run goes: after kill -9 each rank's part file is a Chrome trace
    (JSON array format, whose closing bracket readers do not need)."""
    job = tmp_path / "job.toml"
    job.write_text(SMALL_JOB)
    trace = tmp_path / "trace.json"
    proc = subprocess.Popen(["mpirun", "-n", "2", *python_cmd("-m", "hpc_train.cli", "train", str(job), "--timeline",
                                                              str(trace), "--set", "train.epochs=1000")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_environment(),
                            cwd=ROOT, start_new_session=True)
    parts = [tmp_path / f"trace.json.rank-{rank}.json" for rank in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while not all(p.exists() and p.read_text().count('"forward"') >= 10 for p in parts):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for rank, part in enumerate(parts):
        events = json.loads(part.read_text() + "]")  # what a reader does with an unterminated array
        assert {e["pid"] for e in events} == {rank}
        assert {"forward", "backward", "optimizer step"} <= {e["name"] for e in events if e["ph"] == "X"}
    assert not trace.exists()  # the single file comes only at a normal end


def test_bad_job_file_fails_on_every_rank_before_training(tmp_path):
    job = tmp_path / "bad.toml"
    job.write_text('[model]\nname = "mlp"\n[train]\nepoch = 3\n')
    start = time.monotonic()
    proc = run_mpi(2, python_cmd("-m", "hpc_train.cli", "train", str(job)), timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("unknown key 'train.epoch' (did you mean 'epochs'?)") == 2
    assert time.monotonic() - start < 30


def test_indivisible_global_batch_is_named(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(SMALL_JOB)
    proc = run_mpi(3, python_cmd("-m", "hpc_train.cli", "train", str(job)), timeout=120)
    assert proc.returncode != 0
    assert "train.global_batch = 64 is not divisible by the 3 ranks" in proc.stderr


def test_stall_watchdog_names_the_missing_rank_then_aborts():
    start = time.monotonic()
    proc = run_mpi(2, python_cmd("-c", STALL), timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "ranks that have not submitted it: rank 1 at #0" in proc.stderr
    assert "aborting the job after 4 s" in proc.stderr and "logged its thread stacks" in proc.stderr
    assert elapsed < 20, elapsed
    # rank 0's flight record, printed once at the first warning: its collectives and its threads' stacks
    assert proc.stderr.count("rank 0 on") == 2 and "the last 1 collectives of the engine" in proc.stderr
    assert re.search(r"#1 'bucket0' allreduce \(\d+,\) float32: RUNNING for \d", proc.stderr), proc.stderr
    assert "Thread 0x" in proc.stderr and "in wait_watched" in proc.stderr  # faulthandler: the main thread waits


def step_epochs(tmp_path, *sets: str) -> tuple[list[int], dict]:
    """The epoch of every step record and the summary of a 3-rank run of SMALL_JOB (10 steps an epoch)."""
    job = tmp_path / "job.toml"
    job.write_text(SMALL_JOB)
    metrics = tmp_path / "m.jsonl"
    proc = run_mpi(3, python_cmd("-m", "hpc_train.cli", "train", str(job), "--metrics", str(metrics),
                                 "--set", "train.global_batch=120", "--set", "log.every_steps=1",
                                 "--set", "train.epochs=3", *(a for s in sets for a in ("--set", s))), timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["epoch"] for r in records if r["type"] == "step"], records[-1]


def test_max_steps_bounds_the_whole_run_and_steps_per_epoch_each_epoch(tmp_path):
    epochs, summary = step_epochs(tmp_path, "train.max_steps=13")  # 1200 samples / 120 = 10 steps an epoch
    assert epochs == [0] * 10 + [1] * 3 and summary["steps"] == 13
    epochs, summary = step_epochs(tmp_path, "train.max_steps=7", "train.steps_per_epoch=4")
    assert epochs == [0] * 4 + [1] * 3 and summary["steps"] == 7


@pytest.mark.parametrize("data, sets, message", [
    ("synthetic", ["data.train_samples=1000000000000"], "every rank builds the whole synthetic set"),
    ("synthetic", ["data.shape=[100000, 100000, 3]"], "every rank builds the whole synthetic set"),
    ("synthetic", ["train.global_batch=2000000000000"], "samples of shape [32, 32, 3] a rank need about"),
    ("hdf5", ["train.global_batch=2000000000000"], "samples of shape [32, 32, 3] a rank need about"),
    ("synthetic", ["model.widths=[3072, 2000000000, 10]"],
     "model.widths = [3072, 2000000000, 10]: 6,166,000,000,010 parameters"),
    ("synthetic", ["model.name='cnn'", "model.hidden=4000000000"],
     "model.channels = [32, 64, 128], model.hidden = 4000000000: 8,236,000,093,258 parameters"),
])
def test_data_or_model_that_would_not_fit_in_memory_is_refused_before_allocation(tmp_path, data, sets, message):
    if data == "hdf5":
        for name, n in (("train.h5", 64), ("val.h5", 32)):
            made = run_mpi(2, python_cmd("-m", "hpc_train.cli", "data", "synth", str(tmp_path / name), "--samples",
                                         str(n)), timeout=120)
            assert made.returncode == 0, made.stderr
    job = tmp_path / "job.toml"
    job.write_text(SMALL_JOB)
    sets = sets + (["data.name='hdf5'", f"data.path='{tmp_path / 'train.h5'}'",
                    f"data.val_path='{tmp_path / 'val.h5'}'"] if data == "hdf5" else [])
    started = time.monotonic()
    proc = run_mpi(2, python_cmd("-m", "hpc_train.cli", "train", str(job), *(f"--set={s}" for s in sets)),
                   timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count(message) == 2 and proc.stderr.count("of memory available") == 2, proc.stderr
    assert time.monotonic() - started < 60


def test_a_cnn_with_more_stages_than_the_image_can_halve_is_refused(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(SMALL_JOB)
    proc = run_mpi(2, python_cmd("-m", "hpc_train.cli", "train", str(job), "--set=model.name='cnn'",
                                 "--set=model.channels=[8, 8, 8, 8, 8, 8]"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("6 stages halve (32, 32) images to nothing (at most 5 stages)") == 2, proc.stderr

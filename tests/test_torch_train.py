"""Torch models through `hpc-train train` (serial tests launching mpirun): job files, checkpoints, errors.

The guarantees are those of our NumPy models (tests/test_checkpoint.py): a resumed run's losses equal
the uninterrupted run's to the last bit, resuming at another rank count continues within float32
tolerance, a kill -9 during a write leaves the previous checkpoint whole, a checkpoint that does not
fit the job is named on every rank.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from hpc_train import checkpoint  # noqa: E402
from hpc_train.train import config  # noqa: E402

from .conftest import ROOT, python_cmd, run_mpi  # noqa: E402
from .test_checkpoint import kill_9_during_a_checkpoint_write, losses, train  # noqa: E402

JOB = """
[model]
name = "torch"
factory = "hpc_train.torch.models:mlp"
kwargs = {{widths = [3072, {hidden}, 10], dropout = {dropout}}}
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
bucket_mb = 0.1
node_shared = {node_shared}
[checkpoint]
every_steps = 4
keep_last = 2
directory = "{directory}"
[log]
every_steps = 1
progress = false
"""


def write_job(tmp_path, name="job.toml", hidden=64, dropout=0.1, node_shared=True, directory="ckpt"):
    path = tmp_path / name
    path.write_text(JOB.format(hidden=hidden, dropout=dropout, node_shared=str(node_shared).lower(),
                               directory=tmp_path / directory))
    return path


@pytest.mark.parametrize("node_shared", [True, False], ids=["node-shared", "replicas"])
def test_a_resumed_torch_run_is_bit_for_bit_the_uninterrupted_one(tmp_path, node_shared):
    job = write_job(tmp_path, node_shared=node_shared)  # dropout on: the masks must resume too
    done = train(2, job, tmp_path / "a.jsonl", f"checkpoint.directory={tmp_path / 'a'}")
    assert done.returncode == 0, done.stderr
    assert train(2, job, tmp_path / "b1.jsonl", "train.epochs=1").returncode == 0
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "ckpt")] == [
        "ckpt-000000016.h5", "ckpt-000000020.h5"]
    second = train(2, job, tmp_path / "b2.jsonl", "checkpoint.resume=auto")
    assert second.returncode == 0, second.stderr
    uninterrupted, resumed = losses(tmp_path / "a.jsonl"), losses(tmp_path / "b2.jsonl")
    assert sorted(resumed) == list(range(21, 41))
    assert all(resumed[k] == uninterrupted[k] for k in resumed)
    summary = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[-1])
    assert summary["type"] == "summary" and summary["val_accuracy"] > 0.5  # it learned (10 classes: chance 0.1)


@pytest.mark.parametrize("before, after", [(2, 4), (4, 2)])
def test_a_torch_run_resumes_at_another_rank_count(tmp_path, before, after):
    job = write_job(tmp_path, dropout=0.0)
    assert train(after, job, tmp_path / "a.jsonl", f"checkpoint.directory={tmp_path / 'a'}").returncode == 0
    assert train(before, job, tmp_path / "b1.jsonl", "train.epochs=1").returncode == 0
    proc = train(after, job, tmp_path / "b2.jsonl", "checkpoint.resume=auto")
    assert proc.returncode == 0, proc.stderr
    uninterrupted, resumed = losses(tmp_path / "a.jsonl"), losses(tmp_path / "b2.jsonl")
    assert sorted(resumed) == list(range(21, 41))
    for step, value in resumed.items():
        assert value == pytest.approx(uninterrupted[step], rel=1e-4), step


def test_kill_9_during_a_torch_checkpoint_leaves_the_previous_one_whole(tmp_path):
    job = write_job(tmp_path, hidden=2048, dropout=0.0)  # 50 MB a checkpoint (Adam): writes take a while
    arrays, attrs = kill_9_during_a_checkpoint_write(job, tmp_path / "ckpt")
    assert arrays["model/1.weight"].shape == (2048, 3072) and attrs["step"] >= 1
    assert arrays["optimizer/1.weight/exp_avg_sq"].shape == (2048, 3072)
    resumed = train(2, job, tmp_path / "r.jsonl", "checkpoint.resume=auto", "train.epochs=1")
    assert resumed.returncode == 0, resumed.stderr


def test_checkpoints_that_do_not_fit_a_torch_job_are_named_on_every_rank(tmp_path):
    job = write_job(tmp_path)
    assert train(2, job, tmp_path / "a.jsonl", "train.epochs=1").returncode == 0
    good = checkpoint.complete_checkpoints(tmp_path / "ckpt")[-1]
    other = write_job(tmp_path, "other.toml", hidden=32)
    proc = train(2, other, tmp_path / "y.jsonl", f"checkpoint.resume={good}")
    message = "array 'model/1.weight' has shape (64, 3072) in the checkpoint, (32, 3072) in the job"
    assert proc.returncode != 0 and proc.stderr.count(message) == 2, proc.stderr


def test_a_torch_model_that_does_not_fit_the_data_is_named_on_every_rank(tmp_path):
    job = write_job(tmp_path)
    proc = train(2, job, tmp_path / "x.jsonl", "model.kwargs={widths = [100, 10]}")
    assert proc.returncode != 0
    assert proc.stderr.count("does not take the data's images of shape (32, 32, 3)") == 2, proc.stderr
    proc = train(2, job, tmp_path / "x.jsonl", "model.kwargs={widths = [3072, 4]}")
    assert proc.returncode != 0
    assert proc.stderr.count("outputs 4 values a sample; the data has 10 classes") == 2, proc.stderr


@pytest.mark.parametrize("overrides, message", [
    ({"factory": ""}, "'model.factory' is required when model.name = 'torch'"),
    ({"factory": "hpc_train.torch.models"}, 'expected "package.module:function"'),
    ({"factory": "hpc_train.torch.nowhere:f"}, "cannot import hpc_train.torch.nowhere"),
    ({"factory": "hpc_train.torch.models:resnet"}, "has no function 'resnet'"),
    ({"loss": "cross_entropi"}, "'model.loss' = 'cross_entropi': expected one of ('cross_entropy', 'next_byte') "
                                "(did you mean 'cross_entropy'?)"),
    ({"kwargs": [1]}, "'model.kwargs' must be table"),
])
def test_torch_model_keys_are_checked_when_the_job_is_read(overrides, message):
    from hpc_train.errors import JobFileError
    from hpc_train.torch.trainable import build_module

    model = {"name": "torch", "factory": "hpc_train.torch.models:mlp", "kwargs": {"widths": [4, 2]}, **overrides}
    with pytest.raises(JobFileError, match=None) as error:
        build_module(config.validate({"model": model}, "job.toml").model)
    assert message in str(error.value)


@pytest.mark.parametrize("section, values", [("distributed", {"zero_stage": 2}), ("ps", {"mode": "async"})])
def test_what_torch_models_do_not_offer_is_refused_when_the_job_is_read(section, values):
    from hpc_train.errors import JobFileError

    raw = {"model": {"name": "torch", "factory": "hpc_train.torch.models:mlp"}, section: values}
    with pytest.raises(JobFileError, match="is not available for torch models"):
        config.validate(raw, "job.toml")


def test_the_shipped_resnet20_job_trains(tmp_path):
    job = ROOT / "jobs" / "torch_resnet.toml"
    proc = train(2, job, tmp_path / "m.jsonl", "data.train_samples=256", "data.val_samples=64", "train.max_steps=3",
                 "log.every_steps=1", "log.progress=false")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    summary = records[-1]
    assert summary["type"] == "summary" and summary["steps"] == 3
    assert summary["parameters"] == 269_722  # ResNet-20, 10 classes: convolutions 267,696, BatchNorm 1,376, fc 650
    assert all(r["loss"] > 0 for r in records if r["type"] == "step")


def test_a_scaling_study_runs_a_torch_job_unchanged(tmp_path):
    from .test_scaling import scale, write_study

    job = write_job(tmp_path, dropout=0.0).read_text()
    study = write_study(tmp_path, job=job, mode="weak", ranks=[1, 2], per_rank_batch=16, repeats=1, steps=4,
                        warmup_steps=1, timeout_s=120, bench=[])
    proc = scale(str(study), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["ranks"]: r for r in json.loads((tmp_path / "out" / "study.json").read_text())["rows"]}
    assert rows[1]["status"] == rows[2]["status"] == "ok"
    assert rows[2]["step_ms"] > 0 and rows[2]["samples_per_s"] > 0


def convert(*args, ranks=2):
    proc = run_mpi(ranks, python_cmd("-m", "hpc_train.cli", "data", "convert", *args), timeout=120)
    assert proc.returncode == 0, proc.stderr


def unigram_bits(path) -> float:
    """Bits per byte of the best predictor that ignores context: the entropy of the targets' bytes."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        counts = np.bincount(f["tokens"][:, 1:].ravel(), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_the_byte_transformer_learns_python_source_beyond_byte_frequencies(tmp_path):
    from hpc_train.io.convert import stdlib_folder

    train_set, val_set = tmp_path / "train.h5", tmp_path / "val.h5"
    convert("text", str(train_set), str(stdlib_folder() / "email"), "--val", str(val_set), "--val-every", "5",
            "--context", "32")
    job = ROOT / "jobs" / "torch_gpt.toml"
    proc = train(2, job, tmp_path / "m.jsonl", f"data.path='{train_set}'", f"data.val_path='{val_set}'",
                 "model.kwargs={context = 32, width = 64, layers = 2, heads = 2}", "train.steps_per_epoch=200",
                 "train.epochs=2", "train.global_batch=32", "schedule.warmup_steps=10",
                 "log.every_steps=10", "log.progress=false")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    baseline = unigram_bits(val_set)  # about 4.6 for Python source
    assert epochs[-1]["val_bits_per_byte"] < baseline - 0.6, (epochs, baseline)  # 3.5 measured
    assert epochs[-1]["val_bits_per_byte"] < epochs[0]["val_bits_per_byte"]
    assert "final val bits per byte" in proc.stdout
    # the job's data checks: a classification loss, or one of our NumPy models, on token windows
    proc = train(2, job, tmp_path / "x.jsonl", f"data.path='{train_set}'", f"data.val_path='{val_set}'",
                 "model.loss='cross_entropy'")
    assert proc.returncode != 0
    assert proc.stderr.count("model.loss = 'cross_entropy' classifies images, but the data holds tokens") == 2
    proc = train(2, job, tmp_path / "x.jsonl", f"data.path='{train_set}'", f"data.val_path='{val_set}'",
                 "model.name='mlp'")
    assert proc.returncode != 0 and proc.stderr.count("model.name = 'mlp' classifies images; the data holds "
                                                      "tokens") == 2, proc.stderr


def test_the_shipped_digits_job_reaches_the_known_accuracy_on_2_ranks(tmp_path):
    pytest.importorskip("sklearn")
    train_set, val_set = tmp_path / "train.h5", tmp_path / "val.h5"
    convert("digits", str(train_set), "--val", str(val_set))
    proc = train(2, ROOT / "jobs" / "torch_digits.toml", tmp_path / "m.jsonl", f"data.path='{train_set}'",
                 f"data.val_path='{val_set}'", "log.progress=false")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    assert summary["val_accuracy"] >= 0.97, summary  # 359 held-out real images

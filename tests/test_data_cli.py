"""`hpc-train data` and training from HDF5, as a user runs them (serial tests launching mpirun)."""

from __future__ import annotations

import json

import h5py
import numpy as np

from .conftest import python_cmd, run_mpi

CLI = ("-m", "hpc_train.cli")


def fabricate_cifar(directory, batches=2, records=30, seed=0):
    """Files in CIFAR-10's exact binary format: label byte + 3072 pixel bytes (CHW) per record."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for b in range(batches):
        chw = rng.integers(0, 256, (records, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, records).astype(np.uint8)
        raw = np.concatenate([y[:, None], chw.reshape(records, -1)], axis=1)
        (directory / f"data_batch_{b + 1}.bin").write_bytes(raw.tobytes())
        images.append(chw.transpose(0, 2, 3, 1))
        labels.append(y)
    (directory / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return np.concatenate(images), np.concatenate(labels)


def test_synth_then_inspect(tmp_path):
    out = tmp_path / "synth.h5"
    proc = run_mpi(2, python_cmd(*CLI, "data", "synth", str(out), "--samples", "101", "--seed", "3",
                                 "--chunk-bytes", "16k"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "synth.h5.partial").exists()
    proc = run_mpi(1, python_cmd(*CLI, "data", "inspect", str(out), "--json"), timeout=60)
    report = json.loads(proc.stdout)
    assert report["samples"] == 101 and report["images"]["shape"] == [101, 32, 32, 3]
    assert report["images"]["layout"] == "chunked" and report["images"]["chunks"][0] == 5  # 16 KiB / 3 KiB
    assert report["attributes"]["provenance.seed"] == 3 and len(report["sha256"]) == 64
    from hpc_train.data import synthetic_classification

    images, labels = synthetic_classification(101, seed=3)
    with h5py.File(out, "r") as f:  # written in parallel == generated serially
        np.testing.assert_array_equal(f["images"][...], images)
        np.testing.assert_array_equal(f["labels"][...], labels)


def test_convert_cifar10_binary_and_npz(tmp_path):
    source = tmp_path / "cifar"
    source.mkdir()
    images, labels = fabricate_cifar(source)
    out = tmp_path / "cifar.h5"
    proc = run_mpi(2, python_cmd(*CLI, "data", "convert", "cifar10-binary", str(source), str(out),
                                 "--contiguous"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["images"][...], images)
        np.testing.assert_array_equal(f["labels"][...], labels)
        assert f["images"].chunks is None and list(f.attrs["class_names"])[3] == "class3"
    npz = tmp_path / "arrays.npz"
    np.savez(npz, x=images[:7], y=labels[:7].astype(np.int32))
    proc = run_mpi(2, python_cmd(*CLI, "data", "convert", "npz", str(npz), str(tmp_path / "n.h5"),
                                 "--images-key", "x", "--labels-key", "y"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "n.h5", "r") as f:
        np.testing.assert_array_equal(f["images"][...], images[:7])


def test_convert_rejects_bad_sources(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(b"\0" * 3074)
    proc = run_mpi(2, python_cmd(*CLI, "data", "convert", "cifar10-binary", str(tmp_path), str(tmp_path / "o.h5")),
                   timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("data_batch_1.bin: 3074 bytes is not a whole number of 3073-byte") == 2
    assert not (tmp_path / "o.h5").exists()


def test_train_from_hdf5_and_missing_file(tmp_path):
    for name, start, n in (("train.h5", 0, 1500), ("val.h5", 1500, 300)):
        proc = run_mpi(2, python_cmd(*CLI, "data", "synth", str(tmp_path / name), "--samples", str(n),
                                     "--start", str(start)), timeout=120)
        assert proc.returncode == 0, proc.stderr
    job = tmp_path / "job.toml"
    job.write_text(f"""
[model]
name = "mlp"
widths = [3072, 64, 10]
[data]
name = "hdf5"
path = "{tmp_path / 'train.h5'}"
val_path = "{tmp_path / 'val.h5'}"
[train]
epochs = 2
steps_per_epoch = 8
global_batch = 64
[log]
progress = false
metrics = "{tmp_path / 'm.jsonl'}"
""")
    proc = run_mpi(2, python_cmd(*CLI, "train", str(job)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    assert summary["steps"] == 16 and summary["val_accuracy"] > 0.3
    proc = run_mpi(2, python_cmd(*CLI, "train", str(job), "--set", f"data.path='{tmp_path / 'gone.h5'}'"),
                   timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("gone.h5: cannot open as HDF5") == 2


def test_training_io_workload(tmp_path):
    data = tmp_path / "w.h5"
    proc = run_mpi(2, python_cmd(*CLI, "data", "synth", str(data), "--samples", "640", "--contiguous"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = run_mpi(2, python_cmd(*CLI, "iobench", "--workload", "train", "--data", str(data), "--batch", "32",
                                 "--compute-ms", "20", "--output-format", "json"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    workload = json.loads(proc.stdout)["workload"]
    ranks = workload["per_rank"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["steps"] == 10 and r["measured_steps"] == 9 for r in ranks)
    assert all(0 < r["au"] <= 1 and r["compute_s"] >= 9 * 0.02 for r in ranks)
    total = workload["aggregate"]
    assert total["samples_per_s"] == sum(r["samples_per_s"] for r in ranks)
    assert total["au_min"] == min(r["au"] for r in ranks)
    proc = run_mpi(2, python_cmd(*CLI, "iobench", "--workload", "train", "--data", str(tmp_path / "none.h5")),
                   timeout=60)
    assert proc.returncode != 0 and proc.stderr.count("none.h5: cannot open as HDF5") == 2

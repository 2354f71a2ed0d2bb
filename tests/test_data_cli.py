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


CORPUS = {"a.py": "import os\nprint(os.sep)\n" * 7, "pkg/b.py": "def f(x):\n    return x + 1\n" * 5,
          "pkg/c.py": "class C:\n    pass\n" * 9, "pkg/d.py": "x = [i for i in range(3)]\n" * 4,
          "e.py": "# the last file\n" * 6, "notes.txt": "not python\n",
          "site-packages/other/f.py": "installed, not the corpus\n" * 50}


def write_corpus(root):
    for name, text in CORPUS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def joined(names) -> bytes:
    return b"\0".join(CORPUS[n].encode() for n in names)


def stream_of(windows: np.ndarray) -> bytes:
    """The byte stream that overlapping windows were cut from: the first window, then each next one
    less the byte it shares with its predecessor."""
    return bytes(windows[0]) + b"".join(bytes(w[1:]) for w in windows[1:])


def test_text_corpus_files_windows_and_split(tmp_path):
    from hpc_train.io.convert import byte_windows, split_every, text_files

    root = write_corpus(tmp_path / "lib")
    files = text_files([root])
    names = [f.relative_to(root).as_posix() for f in files]
    assert names == ["a.py", "e.py", "pkg/b.py", "pkg/c.py", "pkg/d.py"]  # sorted, *.py, no site-packages
    windows = byte_windows(files, 16)
    stream = joined(names)
    assert windows.shape == ((len(stream) - 1) // 16, 17) and windows.dtype == np.uint8
    rebuilt = stream_of(windows)
    assert rebuilt == stream[: len(rebuilt)] and len(stream) - len(rebuilt) < 16  # only a last partial window lost
    train, val = split_every(files, 2)
    assert [f.name for f in val] == ["e.py", "c.py"] and len(train) == 3
    assert split_every(files, 0) == (files, [])
    assert [f.name for f in text_files([root / "notes.txt", root / "a.py"])] == ["notes.txt", "a.py"]


def test_convert_text_writes_byte_windows_and_a_held_out_validation_set(tmp_path):
    root = write_corpus(tmp_path / "lib")
    out, val = tmp_path / "sets" / "train.h5", tmp_path / "sets" / "val.h5"  # a folder that does not exist yet
    proc = run_mpi(2, python_cmd(*CLI, "data", "convert", "text", str(out), str(root), "--val", str(val),
                                 "--val-every", "2", "--context", "8", "--chunk-bytes", "100"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for path, names in ((out, ["a.py", "pkg/b.py", "pkg/d.py"]), (val, ["e.py", "pkg/c.py"])):
        with h5py.File(path, "r") as f:
            assert set(f) == {"tokens"} and f.attrs["classes"] == 256
            assert f.attrs["provenance.files"] == len(names) and f.attrs["provenance.context"] == 8
            windows = f["tokens"][...]
        assert windows.shape[1] == 9
        rebuilt = stream_of(windows)
        assert rebuilt == joined(names)[: len(rebuilt)]
    report = json.loads(run_mpi(1, python_cmd(*CLI, "data", "inspect", str(val), "--json"), timeout=60).stdout)
    assert report["tokens"]["shape"] == [len(windows), 9] and "images" not in report
    proc = run_mpi(2, python_cmd(*CLI, "data", "convert", "text", str(tmp_path / "x.h5"), str(root / "a.py"),
                                 "--val", str(tmp_path / "y.h5")), timeout=60)
    assert proc.returncode != 0 and proc.stderr.count("leaves none for validation") == 2, proc.stderr
    proc = run_mpi(2, python_cmd(*CLI, "data", "convert", "text", str(tmp_path / "x.h5"), str(tmp_path / "nowhere")),
                   timeout=60)
    assert proc.returncode != 0 and proc.stderr.count("nowhere: no such file or folder") == 2, proc.stderr
    assert not list(tmp_path.glob("x.h5*")) and not list(tmp_path.glob("y.h5*"))


def test_convert_digits_holds_out_a_share_of_the_real_images(tmp_path):
    from sklearn.datasets import load_digits

    out, val = tmp_path / "train.h5", tmp_path / "val.h5"
    proc = run_mpi(2, python_cmd(*CLI, "data", "convert", "digits", str(out), "--val", str(val)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out, "r") as f, h5py.File(val, "r") as g:
        images = np.concatenate([f["images"][...], g["images"][...]])
        labels = np.concatenate([f["labels"][...], g["labels"][...]])
        assert len(g["labels"]) == 359 and f.attrs["classes"] == 10  # round(1797 * 0.2) held out
    digits = load_digits()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    ours = sorted(zip(map(bytes, (images[..., 0] * 16).round().astype(np.uint8)), labels.tolist(), strict=True))
    theirs = sorted(zip(map(bytes, digits.images.astype(np.uint8)), digits.target.tolist(), strict=True))
    assert ours == theirs  # every image once, with its label, across the two files

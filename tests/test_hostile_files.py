"""Damaged and hostile checkpoints and data sets, through `hpc-train train` as a user runs it
(serial tests; each case is a 2-rank mpirun in a subprocess with a time limit).

Real files (a checkpoint a 2-rank run wrote, data sets `hpc-train data synth` wrote) are
mutated by hypothesis: cut short, bytes flipped, datasets deleted, added, retyped or replaced by
groups, absurd attributes. A case passes when the job trains (the damage was harmless), or
fails with our CheckpointError/DatasetError message naming the file; never with another
exception, never by hanging. A crash inside libhdf5 itself on corrupt metadata (a signal) is
allowed and reported: README lists it as a limit of the library.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .conftest import ROOT, clean_environment

HPC_TRAIN = str(ROOT / ".venv" / "bin" / "hpc-train")
JOB = """
[model]
name = "mlp"
widths = [48, 16, 10]
[data]
name = "hdf5"
path = "{train}"
val_path = "{val}"
[train]
global_batch = 8
max_steps = 4
[checkpoint]
directory = "{checkpoints}"
every_steps = 4
[log]
progress = false
"""


def mpirun(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(["mpirun", "-n", "2", *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_environment(), cwd=ROOT)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A training set, a validation set and a checkpoint, all written by hpc-train itself."""
    folder = tmp_path_factory.mktemp("originals")
    for name, start in (("train.h5", 0), ("val.h5", 64)):
        made = mpirun(HPC_TRAIN, "data", "synth", str(folder / name), "--samples", "64", "--shape", "4,4,3",
                      "--classes", "10", "--start", str(start))
        assert made.returncode == 0, made.stderr
    job = folder / "job.toml"
    job.write_text(JOB.format(train=folder / "train.h5", val=folder / "val.h5", checkpoints=folder / "ckpt"))
    trained = mpirun(HPC_TRAIN, "train", str(job))
    assert trained.returncode == 0, trained.stderr
    return {"job": job, "data": folder / "train.h5", "checkpoint": folder / "ckpt" / "ckpt-000000004.h5"}


def first_dataset(f) -> str:
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sorted(names)[0]


def mutate(path, mutation: tuple) -> None:
    kind, *args = mutation
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * args[0])])
    elif kind == "flip":
        data = bytearray(path.read_bytes())
        for fraction in args[0]:
            data[int(fraction * (len(data) - 1))] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        with h5py.File(path, "r+") as f:
            target = args[0] if args[0] in f else first_dataset(f)
            if kind == "delete":
                del f[target]
            elif kind == "retype":
                data = f[target][...]
                attrs = dict(f[target].attrs)
                del f[target]
                f.create_dataset(target, data=data.astype(args[1]))
                f[target].attrs.update(attrs)
            elif kind == "group":
                del f[target]
                f.create_group(target)
            elif kind == "extra":  # declared huge, never written: reading it would allocate terabytes
                f.create_dataset("zz_extra", shape=(1 << 40,), dtype="f8", chunks=(1 << 16,))
            elif kind == "file_attribute":
                f.attrs[args[0]] = args[1]
            elif kind == "dataset_attribute":
                f[target].attrs["shape"] = args[1]


ABSURD = st.sampled_from([-5, 0, 1 << 40, 2.5, "abc", "[[[[", '{"a": 1}', np.arange(3), "null", '"x" ' * 10])
MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.05, 0.98)),
    st.tuples(st.just("flip"), st.lists(st.floats(0, 1), min_size=1, max_size=6)),
    st.tuples(st.sampled_from(["delete", "group", "extra"]), st.sampled_from(["images", "labels", "model", ""])),
    st.tuples(st.just("retype"), st.sampled_from(["images", "labels", ""]), st.sampled_from(["f8", "i1", "u8"])),
    st.tuples(st.just("file_attribute"),
              st.sampled_from(["classes", "step", "epoch", "rng", "optimizer_steps", "layout", "world_size",
                               "next_batch", "run_id", "epoch_sample", "format"]), ABSURD),
    st.tuples(st.just("dataset_attribute"), st.just(""), st.sampled_from([[10 ** 9], [-1], [], "abc", [2, 2]])),
)


def check_outcome(proc, damaged, what) -> None:
    """Trained, or our error naming the file; a libhdf5 crash is noted, anything else fails."""
    if proc.returncode == 0:
        return
    ours = (f"hpc-train train: {damaged}" in proc.stderr
            or re.search(rf"(Checkpoint|Dataset)Error: {re.escape(str(damaged))}", proc.stderr))
    if ours:
        assert "Traceback" not in proc.stderr or "DatasetError" in proc.stderr, proc.stderr[-3000:]
        return
    if proc.returncode < 0 or re.search(r"signal (6|7|11)|Segmentation fault|Bus error|Aborted", proc.stderr):
        warnings.warn(f"libhdf5 crashed on {what}: {proc.stderr.strip().splitlines()[-1][:200]}", stacklevel=2)
        return
    pytest.fail(f"{what}: exit code {proc.returncode} without our error:\n{proc.stderr[-3000:]}")


FUZZ = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(mutation=MUTATIONS)
@example(mutation=("truncate", 0.5))
@example(mutation=("extra", ""))
@example(mutation=("file_attribute", "step", -5))
@example(mutation=("file_attribute", "rng", "abc"))
@example(mutation=("dataset_attribute", "", [10 ** 9]))
@example(mutation=("retype", "", "f8"))
@example(mutation=("flip", [0.8147591374754346]))  # h5py's RuntimeError "bad symbol table node signature"
def test_a_damaged_checkpoint_resumes_or_is_refused_by_name(originals, tmp_path, mutation):
    damaged = tmp_path / "ckpt-000000004.h5"
    shutil.copy(originals["checkpoint"], damaged)
    mutate(damaged, mutation)
    proc = mpirun(HPC_TRAIN, "train", str(originals["job"]), "--set", f"checkpoint.resume={damaged}",
                  "--set", "train.max_steps=6", "--set", f"checkpoint.directory={tmp_path / 'out'}")
    check_outcome(proc, damaged, f"checkpoint {mutation}")
    if proc.returncode == 2:  # refused before training: on every rank, by name
        assert proc.stderr.count(f"hpc-train train: {damaged}") == 2, proc.stderr[-3000:]


@FUZZ
@given(mutation=MUTATIONS)
@example(mutation=("truncate", 0.5))
@example(mutation=("extra", ""))
@example(mutation=("file_attribute", "classes", 1 << 40))
@example(mutation=("file_attribute", "classes", "abc"))
@example(mutation=("retype", "labels", "f8"))
@example(mutation=("group", "images"))
def test_a_damaged_data_set_trains_or_is_refused_by_name(originals, tmp_path, mutation):
    damaged = tmp_path / "train.h5"
    shutil.copy(originals["data"], damaged)
    mutate(damaged, mutation)
    proc = mpirun(HPC_TRAIN, "train", str(originals["job"]), "--set", f"data.path={damaged}",
                  "--set", f"checkpoint.directory={tmp_path / 'out'}")
    check_outcome(proc, damaged, f"data set {mutation}")
    if proc.returncode == 2:
        assert proc.stderr.count(f"hpc-train train: {damaged}") == 2, proc.stderr[-3000:]


"""Whole-job behaviour through our own mpirun: abort on exception, CLI, benchmark, packaging."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, TINY_JOB, python_cmd, run_mpi

RAISE_ON_RANK_2 = """
import time, numpy as np, hpc_train as ht
ht.init()
if ht.rank() == 2:
    raise RuntimeError("boom on purpose")
ht.allreduce(np.ones(4))  # the other ranks block here until the abort ends them
time.sleep(60)
"""


def test_exception_on_one_rank_ends_the_job_fast():
    start = time.monotonic()
    proc = run_mpi(4, python_cmd("-c", RAISE_ON_RANK_2), timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 15, f"job took {elapsed:.1f}s to end"
    assert "[2/4] CRITICAL hpc_train: uncaught exception on rank 2" in proc.stderr
    assert "RuntimeError: boom on purpose" in proc.stderr


def test_info_json():
    proc = run_mpi(2, python_cmd("-m", "hpc_train.cli", "info", "--json"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)  # rank 0 alone prints
    assert info["world_size"] == 2 and info["nodes"] == 1 and info["ranks_per_node"] == [2]
    assert info["thread_level"] == "multiple"
    assert info["h5py_parallel"] is True
    # the witness: the launcher on PATH (Open MPI's mpirun, or MPICH's Hydra in `make test-mpich`)
    hydra = "HYDRA" in subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout
    if hydra:
        assert info["cuda_aware"] is False and "MPIR_CVAR_ENABLE_GPU" in info["cuda_aware_how"]
        assert info["mpi_library"].startswith("MPICH")
    else:
        assert info["cuda_aware"] is False and "ompi_info" in info["cuda_aware_how"]
        assert info["mpi_library"].startswith("Open MPI")


def test_info_table_with_pretended_nodes():
    proc = run_mpi(4, python_cmd("-m", "hpc_train.cli", "info"), timeout=120,
                   env={"HPC_TRAIN_RANKS_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stderr
    assert "nodes            2" in proc.stdout and "pretended_nodes  True" in proc.stdout


def test_bench_allreduce_json_and_tune(tmp_path):
    out, table = tmp_path / "bench.json", tmp_path / "tuning.json"
    proc = run_mpi(2, python_cmd("bench/allreduce.py", "-b", "8", "-e", "1M", "-f", "32", "-r", "2",
                                 "--min-time", "0.002", "-a", "mpi,ring,shm,shm+shared,auto",
                                 "--json", str(out), "--tune", "--tune-out", str(table)), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# Avg bus bandwidth" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["machine"]["ranks"] == 2
    rows = doc["results"]
    assert {r["algorithm"] for r in rows} == {"mpi", "ring", "shm", "shm+shared", "auto"}
    assert all(r["wrong"] == 0 and r["time_us"] > 0 for r in rows)
    assert all(r["limit_busbw"] > 0 for r in rows)
    rules = json.loads(table.read_text())["tables"]["1x2"]
    assert rules[-1][0] is None


def test_bench_rejects_unknown_algorithm():
    proc = run_mpi(1, python_cmd("-m", "hpc_train.cli", "bench", "allreduce", "-a", "nccl"), timeout=60)
    assert proc.returncode != 0 and "unknown algorithm(s) ['nccl']" in proc.stderr


@pytest.mark.slow
def test_regular_install_ships_subpackages(tmp_path):
    """`pip install .` (not editable) maps kernels/ and io/ to hpc_train.kernels and hpc_train.io."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                    "--target", str(target), str(ROOT)], check=True, timeout=300)
    probe = ("import hpc_train, hpc_train.io, hpc_train.kernels, io, json\n"
             "from importlib import resources\n"
             "print(json.dumps({'pkg': hpc_train.__file__, 'io': hpc_train.io.__file__,"
             " 'kernels': hpc_train.kernels.__file__, 'stdlib_io': io.__file__ or '',"
             " 'tuning': resources.files('hpc_train').joinpath('tuning/allreduce.json').is_file()}))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    where = json.loads(proc.stdout)
    for key in ("pkg", "io", "kernels"):
        assert where[key].startswith(str(target)), where
    assert where["io"].endswith("hpc_train/io/__init__.py")
    assert where["kernels"].endswith("hpc_train/kernels/__init__.py")
    assert "site-packages" not in where["stdlib_io"] and where["tuning"]


IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, hpc_train
refused, names = {}, []
for module in pkgutil.walk_packages(hpc_train.__path__, "hpc_train.", onerror=lambda name: None):
    if not module.name.endswith("__main__"):
        names.append(module.name)
        try:
            importlib.import_module(module.name)
        except ImportError as exc:
            refused[module.name] = str(exc)
print(json.dumps({"file": hpc_train.__file__, "names": names, "refused": refused}))
"""


def imported_modules(python, cwd) -> dict:
    probe = subprocess.run([str(python), "-c", IMPORT_EVERY_MODULE], capture_output=True, text=True, timeout=180,
                           cwd=cwd)
    assert probe.returncode == 0, probe.stderr
    return json.loads(probe.stdout)


def source_modules() -> set[str]:
    """Every module of the source tree by its import name (io/ and kernels/ are hpc_train.io, .kernels)."""
    names = set()
    for top, package in ((ROOT / "hpc_train", "hpc_train"), (ROOT / "io", "hpc_train.io"),
                         (ROOT / "kernels", "hpc_train.kernels")):
        for path in top.rglob("*.py"):
            parts = path.relative_to(top).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts[-1:] != ("__main__",):
                names.add(".".join((package, *parts)))
    return names - {"hpc_train"}


def parallel_h5py_wheel():
    """The h5py wheel `make setup` built against Open MPI's parallel HDF5 (Makefile: WHEEL_CACHE)."""
    import importlib.metadata
    import os
    from pathlib import Path

    cache = Path(os.environ.get("WHEEL_CACHE", Path.home() / ".cache/hpc_train/wheels")) / "openmpi"
    found = sorted(cache.glob(f"h5py-{importlib.metadata.version('h5py')}-*.whl"))
    assert found, f"no parallel h5py wheel in {cache}: run `make setup` first"
    return found[0]


@pytest.mark.slow
def test_regular_install_trains_from_outside_the_checkout(tmp_path):
    """What README's install gives a user: a wheel built from the source tree, installed by pip into
    a fresh venv (its dependencies resolved from the wheel's own metadata; nothing of the checkout or
    the test interpreter), ships every subpackage: each module imports outside the checkout, except
    hpc_train.torch, which names its extra until that is installed and then imports too.
    `hpc-train --version` and `python -m hpc_train` work, `hpc-train train` runs a few steps under
    mpirun and `hpc-train iobench` a tiny fio job. (CuPy, the gpu extra, is not installed: no GPU.)"""
    import importlib.metadata

    source, venv = tmp_path / "source", tmp_path / "venv"  # a copy without build/: setuptools keeps stale files
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "results", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("hpc_train-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(parallel_h5py_wheel()), f"hpc_train[hdf5] @ {wheel.as_uri()}"], check=True,
                   timeout=600, cwd=tmp_path)
    modules = source_modules()
    torch_modules = {name for name in modules if name == "hpc_train.torch" or name.startswith("hpc_train.torch.")}

    without_torch = imported_modules(python, tmp_path)
    assert without_torch["file"].startswith(str(venv)), without_torch["file"]
    assert set(without_torch["names"]) == modules - torch_modules | {"hpc_train.torch"}
    assert list(without_torch["refused"]) == ["hpc_train.torch"], without_torch["refused"]
    assert "pip install 'hpc_train[torch]'" in without_torch["refused"]["hpc_train.torch"]

    torch_pin = f"torch=={importlib.metadata.version('torch').split('+')[0]}"  # pip's CPU build, not CUDA's
    subprocess.run([*pip, f"hpc_train[torch] @ {wheel.as_uri()}", torch_pin], check=True, timeout=600, cwd=tmp_path)
    with_torch = imported_modules(python, tmp_path)
    assert set(with_torch["names"]) == modules and not with_torch["refused"], with_torch["refused"]

    installed = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
    for command in (["hpc-train", "--version"], [str(python), "-m", "hpc_train", "--version"]):
        version = subprocess.run(command, capture_output=True, text=True, timeout=60, env=installed, cwd=tmp_path)
        assert version.stdout.strip() == "hpc-train 0.1.0", version.stderr
    job = tmp_path / "job.toml"
    job.write_text(TINY_JOB.replace("[train]\n", "[train]\nepochs = 1\nsteps_per_epoch = 4\n"))
    metrics = tmp_path / "m.jsonl"
    proc = run_mpi(2, [str(python), "-m", "hpc_train.cli", "train", str(job), "--metrics", str(metrics)],
                   timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(metrics.read_text().splitlines()[-1])
    assert summary["type"] == "summary" and summary["steps"] == 4 and summary["ranks"] == 2
    fio = tmp_path / "tiny.fio"
    fio.write_text(f"[t]\nrw=write\nbs=64k\nsize=256k\ndirectory={tmp_path}\n")
    proc = run_mpi(1, [str(python), "-m", "hpc_train", "iobench", str(fio), "--output-format", "json"],
                   timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["jobs"][0]["write"]["io_bytes"] == 256 * 1024

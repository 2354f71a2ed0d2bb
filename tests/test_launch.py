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
import importlib, pkgutil, hpc_train
names = [m.name for m in pkgutil.walk_packages(hpc_train.__path__, "hpc_train.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(hpc_train.__file__, len(names))
"""


@pytest.mark.slow
def test_regular_install_trains_from_outside_the_checkout(tmp_path):
    """What README's install gives a user: a wheel built from the source tree ships every subpackage
    and module (each imports, outside the checkout), `hpc-train --version` and `python -m hpc_train`
    work, `hpc-train train` runs a few steps and `hpc-train iobench` a tiny fio job."""
    source, target = tmp_path / "source", tmp_path / "site"  # a copy without build/: setuptools keeps stale files there
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "results", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("hpc_train-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    sources = {p.parent.relative_to(ROOT / "hpc_train") for p in (ROOT / "hpc_train").rglob("__init__.py")}
    shipped = {p.parent.relative_to(target / "hpc_train") for p in (target / "hpc_train").rglob("__init__.py")}
    assert sources <= shipped, f"left out of a regular install: {sorted(map(str, sources - shipped))}"
    installed = {"PYTHONPATH": str(target), "PATH": f"{target / 'bin'}:/usr/bin:/bin"}
    probe = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE], capture_output=True, text=True, timeout=120,
                           env=installed, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    where, count = probe.stdout.split()
    modules = [p for p in (*(ROOT / "hpc_train").rglob("*.py"), *(ROOT / "io").rglob("*.py"),
                           *(ROOT / "kernels").rglob("*.py")) if p.name != "__main__.py"]
    assert where.startswith(str(target)) and int(count) == len(modules) - 1  # hpc_train/__init__.py itself
    for command in (["hpc-train", "--version"], [sys.executable, "-m", "hpc_train", "--version"]):
        version = subprocess.run(command, capture_output=True, text=True, timeout=60, env=installed, cwd=tmp_path)
        assert version.stdout.strip() == "hpc-train 0.1.0", version.stderr
    job = tmp_path / "job.toml"
    job.write_text(TINY_JOB.replace("[train]\n", "[train]\nepochs = 1\nsteps_per_epoch = 4\n"))
    metrics = tmp_path / "m.jsonl"
    proc = run_mpi(2, [sys.executable, "-m", "hpc_train.cli", "train", str(job), "--metrics", str(metrics)],
                   timeout=300, env={"PYTHONPATH": str(target)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(metrics.read_text().splitlines()[-1])
    assert summary["type"] == "summary" and summary["steps"] == 4 and summary["ranks"] == 2
    fio = tmp_path / "tiny.fio"
    fio.write_text(f"[t]\nrw=write\nbs=64k\nsize=256k\ndirectory={tmp_path}\n")
    proc = run_mpi(1, [sys.executable, "-m", "hpc_train", "iobench", str(fio), "--output-format", "json"],
                   timeout=120, env={"PYTHONPATH": str(target)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["jobs"][0]["write"]["io_bytes"] == 256 * 1024

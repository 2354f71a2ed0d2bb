"""Shared helpers: launching our own mpirun from serial tests, and the MPI fixtures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "true",
    "OMPI_MCA_btl_base_warn_component_unused": "0",
}


# A job small enough for a test to train under mpirun in a few seconds.
TINY_JOB = """
[model]
name = "mlp"
widths = [3072, 32, 10]
[data]
train_samples = 512
val_samples = 128
[train]
global_batch = 12
[log]
progress = false
"""


def clean_environment() -> dict:
    """This process's environment without what an MPI singleton left in it, plus MPI_ENV.

    A test that imported mpi4py made this pytest process an MPI singleton, which puts
    OMPI_*/PMIX_* variables into its environment; handed on, they make a later mpirun
    (inside a Slurm job, at least) exit 1 without a word. A user's shell has none of them.
    """
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "OPAL_", "ORTE_"))}
    return {**kept, **MPI_ENV}


def run_mpi(nranks: int, args: list[str], timeout: float = 120, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """mpirun -n NRANKS ARGS..., time-boxed; returns the completed process (never raises on rc)."""
    full_env = {**clean_environment(), **(env or {})}
    return subprocess.run(["mpirun", "-n", str(nranks), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)


def rank_pids(launcher_pid: int) -> list[int]:
    """The Python processes below a launcher, oldest first: Open MPI's mpirun starts the ranks
    itself, MPICH's Hydra through a proxy process."""
    found, parents = [], [launcher_pid]
    while parents:
        children = subprocess.run(["pgrep", "-P", ",".join(map(str, parents))], capture_output=True,
                                  text=True).stdout.split()
        parents = [int(c) for c in children]
        found += [c for c in parents if "python" in Path(f"/proc/{c}/comm").read_text(errors="replace")]
    return sorted(found)


# What a launcher says when it ends a job because a rank died of SIGKILL (Open MPI's mpirun on
# stderr, MPICH's Hydra on stdout)
KILLED_RANK = re.compile(r"exited on signal 9|Killed \(signal 9\)")


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


@pytest.fixture(scope="session")
def comm():
    """MPI.COMM_WORLD after hpc_train.init() (for tests marked mpi)."""
    import hpc_train

    hpc_train.init()
    from mpi4py import MPI

    return MPI.COMM_WORLD

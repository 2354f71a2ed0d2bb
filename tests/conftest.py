"""Shared helpers: launching our own mpirun from serial tests, and the MPI fixtures."""

from __future__ import annotations

import os
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


def run_mpi(nranks: int, args: list[str], timeout: float = 120, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """mpirun -n NRANKS ARGS..., time-boxed; returns the completed process (never raises on rc)."""
    full_env = {**os.environ, **MPI_ENV, **(env or {})}
    return subprocess.run(["mpirun", "-n", str(nranks), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


@pytest.fixture(scope="session")
def comm():
    """MPI.COMM_WORLD after hpc_train.init() (for tests marked mpi)."""
    import hpc_train

    hpc_train.init()
    from mpi4py import MPI

    return MPI.COMM_WORLD

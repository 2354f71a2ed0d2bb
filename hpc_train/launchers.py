"""Which launcher starts MPI ranks here: srun inside a Slurm allocation whose srun offers PMIx
(job steps of the allocation), mpirun otherwise. Used by the programs that start ranks
themselves: the scaling study and the elastic supervisor."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

from . import settings


def in_slurm_allocation() -> bool:
    return "SLURM_JOB_ID" in os.environ and shutil.which("srun") is not None


@functools.cache
def srun_has_pmix() -> bool:
    try:
        listed = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "pmix" in listed.stdout + listed.stderr


def preferred() -> str:
    """"srun" or "mpirun" (HPC_TRAIN_LAUNCHER=mpirun, as for the sbatch scripts, forces mpirun)."""
    if settings.current().launcher == "mpirun":
        return "mpirun"
    return "srun" if in_slurm_allocation() and srun_has_pmix() else "mpirun"

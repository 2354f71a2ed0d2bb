# Sourced by the sbatch scripts: `launch SUBCOMMAND ARGS...` runs hpc-train on every task of
# the allocation, with srun --mpi=pmix where Slurm offers it, else mpirun.
venv=${HPC_TRAIN_VENV:-$PWD/.venv}
if [ ! -x "$venv/bin/hpc-train" ]; then
  echo "no hpc-train in $venv: run 'make demo' in the checkout first, or set HPC_TRAIN_VENV" >&2
  exit 2
fi
if [ "$(id -u)" = 0 ]; then  # Open MPI refuses root unless told
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
launch() {
  local launcher=${HPC_TRAIN_LAUNCHER:-srun}
  if [ "$launcher" = srun ] && srun --mpi=list 2>&1 | grep -q pmix; then
    srun --mpi=pmix --kill-on-bad-exit=1 "$venv/bin/hpc-train" "$@"  # one failed task ends the step
  else
    mpirun -n "${SLURM_NTASKS:-1}" "$venv/bin/hpc-train" "$@"
  fi
}

# Sourced by the sbatch scripts.
#   launch SUBCOMMAND ARGS...      runs hpc-train on every task of the allocation, with
#                                  srun --mpi=pmix where Slurm offers it, else mpirun
#                                  (the prefix it uses: the array LAUNCHER after `launcher`)
#   run_training [--elastic] [JOB.toml [options]]
#                                  the body of train.sbatch and elastic.sbatch: trains JOB (default
#                                  $JOB, else jobs/demo.toml) preemptibly, resuming after a requeue
#   preemptible COMMAND ARGS...    runs COMMAND in the background, passes the batch shell's USR1
#                                  (Slurm's --signal=B:USR1@GRACE warning) on to it, and when it
#                                  exits with 75 (preempted: checkpoint written) requeues the job,
#                                  or, where the job may not be requeued, resubmits it to run after
#                                  this one
venv=${HPC_TRAIN_VENV:-$PWD/.venv}
if [ ! -x "$venv/bin/hpc-train" ]; then
  echo "no hpc-train in $venv: run 'make demo' in the checkout first, or set HPC_TRAIN_VENV" >&2
  exit 2
fi
if [ "$(id -u)" = 0 ]; then  # Open MPI refuses root unless told
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# Open MPI's mpirun answers SIGTERM (Slurm's at a time limit, or at a preemption with GraceTime) by
# killing the ranks 2 s later; give them Slurm's own KillWait (30 s by default) to checkpoint. The
# price: mpirun then also takes twice that long to end a job one of whose ranks failed or exited
# non-zero (measured: 2 s with the default, 20 s with 10). srun needs none of it.
export OMPI_MCA_odls_base_sigkill_timeout=${OMPI_MCA_odls_base_sigkill_timeout:-30}
EXIT_PREEMPTED=75

launcher() {
  if [ "${HPC_TRAIN_LAUNCHER:-srun}" = srun ] && srun --mpi=list 2>&1 | grep -q pmix; then
    LAUNCHER=(srun --mpi=pmix --kill-on-bad-exit=1)  # one failed task ends the step
  else
    LAUNCHER=(mpirun -n "${SLURM_NTASKS:-1}")
  fi
}

launch() { launcher; "${LAUNCHER[@]}" "$venv/bin/hpc-train" "$@"; }

say() { echo "$(date +%T) ${SLURM_JOB_ID:+job $SLURM_JOB_ID: }$*" >&2; }

preemptible() {  # COMMAND must be a program (srun, mpirun, hpc-train), not a shell function
  "$@" &
  local pid=$! rc
  # srun and mpirun pass USR1 on to every task; srun would turn TERM into KILL, so never send TERM
  trap 'say "USR1: the job ends soon; asking the ranks to checkpoint and stop"; kill -USR1 $pid 2>/dev/null || true' USR1
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done  # wait returns early at each trapped signal
  wait "$pid" && rc=0 || rc=$?  # the step's own exit status
  trap - USR1
  [ "$rc" = "$EXIT_PREEMPTED" ] && requeue_or_resubmit
  return "$rc"
}

requeue_or_resubmit() {
  [ -n "${SLURM_JOB_ID:-}" ] || { say "preempted outside Slurm: run the job again to resume"; return 0; }
  say "preempted: checkpoint written; requeueing (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )))"
  local why
  if why=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
    return 0
  fi
  # requeue not allowed (sbatch --no-requeue, or the site's JobRequeue=0): the same script and
  # arguments as a new job that starts when this one has ended
  local info script out err
  info=$(scontrol show job -o "$SLURM_JOB_ID")
  script=$(sed -n 's/.* Command=\([^ ]*\).*/\1/p' <<<"$info")
  out=$(sed -n 's/.* StdOut=\([^ ]*\).*/\1/p' <<<"$info")
  err=$(sed -n 's/.* StdErr=\([^ ]*\).*/\1/p' <<<"$info")
  say "requeue refused ($why); resubmitting $script to run after this job"
  sbatch --dependency="afterany:$SLURM_JOB_ID" --job-name="$SLURM_JOB_NAME" --ntasks="${SLURM_NTASKS:-1}" \
    --nodes="${SLURM_JOB_NUM_NODES:-1}" ${SLURM_JOB_PARTITION:+--partition="$SLURM_JOB_PARTITION"} \
    --open-mode=append ${out:+--output="$out"} ${err:+--error="$err"} --export=ALL,HPC_TRAIN_RESUBMITTED=1 \
    "$script" "${script_args[@]}"
}

run_training() {
  local elastic=()
  if [ "${1:-}" = --elastic ]; then elastic=(--elastic); shift; fi
  script_args=("$@")  # what a resubmitted job is given again
  local job=${1:-${JOB:-jobs/demo.toml}}
  shift || true  # what follows the job file goes to hpc-train train
  export HPC_TRAIN_PREEMPT_GRACE_S=${HPC_TRAIN_PREEMPT_GRACE_S:-120}  # the lead time of --signal
  local resume=()
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || [ -n "${HPC_TRAIN_RESUBMITTED:-}" ]; then
    resume=(--set checkpoint.resume=auto)  # a requeued or resubmitted run continues from its checkpoint
  fi
  if [ ${#elastic[@]} -gt 0 ]; then  # the supervisor starts (and restarts) the job steps itself
    preemptible "$venv/bin/hpc-train" train --elastic "$job" ${EXTRA_ARGS:-} "$@" "${resume[@]}"
  else
    launcher
    preemptible "${LAUNCHER[@]}" "$venv/bin/hpc-train" train "$job" ${EXTRA_ARGS:-} "$@" "${resume[@]}"
  fi
}

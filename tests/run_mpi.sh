#!/usr/bin/env bash
# Run the MPI-marked tests on N ranks under mpirun, time-boxed so a hang fails fast.
# Rank 0 prints to the terminal; other ranks log to files shown only on failure.
# usage: tests/run_mpi.sh NRANKS [TIMEOUT_S] [pytest args...]
# The launcher is the first mpirun on PATH (Open MPI's, or MPICH's Hydra for `make test-mpich`).
set -uo pipefail
nranks=$1; limit=${2:-900}; shift; shift || true
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
logs=$(mktemp -d /tmp/hpc_train_mpi_tests.XXXXXX)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
export OMPI_MCA_rmaps_base_oversubscribe=true OMPI_MCA_btl_base_warn_component_unused=0
echo "== MPI tests: $nranks ranks${HPC_TRAIN_RANKS_PER_NODE:+, pretended nodes of $HPC_TRAIN_RANKS_PER_NODE} (limit ${limit}s, other ranks' logs in $logs)"
timeout -k 15 "$limit" mpirun -n "$nranks" bash -c '
  rank=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-0}}
  if [ "$rank" = 0 ]; then exec "$@"
  else exec "$@" > "'"$logs"'/rank$rank.log" 2>&1; fi' _ \
  "$python" -m pytest --with-mpi -m mpi -q --color=no -p no:cacheprovider "$@" "$here/tests"
rc=$?
if [ $rc -ne 0 ]; then
  [ $rc -eq 124 ] && echo "MPI tests on $nranks ranks exceeded ${limit}s and were killed"
  for f in "$logs"/rank*.log; do [ -f "$f" ] && { echo "--- tail of $f"; tail -n 40 "$f"; }; done
fi
exit $rc

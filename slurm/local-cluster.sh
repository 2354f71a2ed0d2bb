#!/usr/bin/env bash
# A one-node Slurm on this machine, for tests and for trying the sbatch scripts.
#   slurm/local-cluster.sh up | down | status
# Needs root and Debian's slurmctld slurmd slurm-client munge (installed by `up` if missing).
# State and logs live in $SLURM_LOCAL_DIR (default /run/hpc_train-slurm, private to root).
# It writes /etc/slurm/slurm.conf, and so refuses to run where a slurm.conf it did not write is
# there (a real installation) unless HPC_TRAIN_LOCAL_SLURM_FORCE=1; `down` stops only the
# daemons it started.
set -euo pipefail
source "$(dirname "$0")/private-state.sh"
dir=${SLURM_LOCAL_DIR:-/run/hpc_train-slurm}
conf=${SLURM_CONF:-/etc/slurm/slurm.conf}  # Slurm's own variable for it
MARK="# written by hpc_train's slurm/local-cluster.sh"

refuse_a_real_installation() {
  # ours: the mark, or (written before it) our state directory's name in the PID file paths
  if [ -f "$conf" ] && ! grep -q -e "^$MARK\$" -e "PidFile=.*/hpc_train-slurm/" "$conf" \
     && [ "${HPC_TRAIN_LOCAL_SLURM_FORCE:-0}" != 1 ]; then
    echo "local-cluster: $conf was not written by this script (a real Slurm installation?): not touching it" \
         "(HPC_TRAIN_LOCAL_SLURM_FORCE=1 overwrites it)" >&2
    exit 3
  fi
}

up() {
  refuse_a_real_installation
  private_state "$dir"
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  fi
  mkdir -p "$dir/state" "$dir/spool" "$(dirname "$conf")" /run/munge
  # the hardware's CPUs as slurmd sees them (nproc honours OMP_NUM_THREADS, 1 on most HPC jobs,
  # and a node of CPUs=1 leaves the 2-task train.sbatch pending forever)
  host=$(hostname)
  cpus=$(slurmd -C 2>/dev/null | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -n1)
  cpus=${cpus:-$(nproc --all)}
  # cred_expire: a requeued job waits this long before it may start again (120 s by default);
  # KillWait: TERM to KILL for the tasks of a step that ends (30 s by default; our ranks hold TERM
  # for a checkpoint, so a rank that waits on a dead peer goes only at the KILL)
  cat > "$conf" <<CONF
$MARK
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
AuthInfo=cred_expire=5
KillWait=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldLogFile=$dir/ctld.log
SlurmdLogFile=$dir/d.log
SlurmctldPidFile=$dir/ctld.pid
SlurmdPidFile=$dir/d.pid
SlurmUser=root
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  chown munge:munge /run/munge
  # a munged that answers, not a process of that name or a socket file: a chroot sees its host's
  # munged (serving another /run), and a munged that died leaves its socket behind
  munge -n </dev/null >/dev/null 2>&1 || munged --force
  started slurmctld "$dir/ctld.pid" || slurmctld
  started slurmd "$dir/d.pid" || slurmd
  # idle within a few seconds when healthy; each sinfo waits ~10 s for a controller that is not
  # there, so the wait is bounded by the clock, not by a number of tries
  local deadline=$((SECONDS + 60))
  while [ $SECONDS -lt $deadline ]; do
    if timeout 10 sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "slurm up: $(sinfo -h -o '%P %D %t')"; return 0
    fi
    sleep 1
  done
  echo "slurm did not come up within 60 s; see $dir/ctld.log and $dir/d.log" >&2
  return 1
}

# started NAME PIDFILE: whether the daemon this script started is still running
started() { [ -f "$2" ] && ours "$(cat "$2")" "$1"; }

down() {
  local pids=""
  for pidfile in "$dir/d.pid" "$dir/ctld.pid"; do  # only the daemons that this script started
    if [ -f "$pidfile" ] && ours "$(cat "$pidfile")" slurmd slurmctld; then pids="$pids $(cat "$pidfile")"; fi
  done
  [ -n "$pids" ] && kill $pids 2>/dev/null || true
  for _ in $(seq 1 20); do  # wait until they have exited
    alive=""
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.5
  done
  echo "slurm down"
}

status() { timeout 10 sinfo 2>/dev/null || { echo "slurm not running"; return 1; }; }

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

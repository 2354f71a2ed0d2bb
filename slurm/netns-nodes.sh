#!/usr/bin/env bash
# Several MPI "nodes" on one machine: network namespaces with their own hostnames and
# addresses, joined by veth links to a bridge, so that mpirun places ranks on separate nodes
# that talk over TCP (recipe: ../shared/notes/multinode.md). Needs root and iproute2.
#
#   slurm/netns-nodes.sh up N [RANKS_PER_NODE]   create nodes node0..node{N-1} (10.77.0.1...)
#   slurm/netns-nodes.sh run COMMAND...          run COMMAND on node0 with mpirun set up for the
#                                                nodes (hostfile, rsh agent, TCP interfaces)
#   slurm/netns-nodes.sh cut K | heal K          take node K's link down / up (fault injection)
#   slurm/netns-nodes.sh status | down
#
# e.g. slurm/netns-nodes.sh up 2 2 && slurm/netns-nodes.sh run mpirun -n 4 .venv/bin/hpc-train info
# State (hostfile, agent, env) lives in $HPC_TRAIN_NETNS_DIR (default /run/hpc_train-netns,
# private to root: mpirun runs the agent script as root).
set -euo pipefail
source "$(dirname "$0")/private-state.sh"
STATE=${HPC_TRAIN_NETNS_DIR:-/run/hpc_train-netns}
PREFIX=htnode
SWITCH=htswitch
SUBNET=10.77.0

die() { echo "netns-nodes: $*" >&2; exit 1; }
nodes() { ip netns list 2>/dev/null | awk '{print $1}' | grep "^${PREFIX}[0-9]*$" | sort -V || true; }

up() {
  local n=${1:?usage: up N [RANKS_PER_NODE]} per=${2:-1}
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
  command -v ip >/dev/null || die "needs iproute2 (apt-get install iproute2)"
  [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "N must be 1..200, got $n"
  private_state "$STATE"
  down >/dev/null 2>&1 || true
  private_state "$STATE"  # down removed it
  ip netns add "$SWITCH"
  ip -n "$SWITCH" link add br0 type bridge
  ip -n "$SWITCH" link set br0 up
  : > "$STATE/hostfile"
  for ((k = 0; k < n; k++)); do
    ip netns add "$PREFIX$k"
    ip link add "htv$k" type veth peer name "htp$k"
    ip link set "htv$k" netns "$PREFIX$k"
    ip link set "htp$k" netns "$SWITCH"
    ip -n "$SWITCH" link set "htp$k" master br0 up
    ip -n "$PREFIX$k" addr add "$SUBNET.$((k + 1))/24" dev "htv$k"
    ip -n "$PREFIX$k" link set lo up
    ip -n "$PREFIX$k" link set "htv$k" up
    echo "$SUBNET.$((k + 1)) slots=$per" >> "$STATE/hostfile"
  done
  # Open MPI starts its daemon on a host as `AGENT HOST COMMAND...`: enter that node.
  cat > "$STATE/agent" <<EOF
#!/bin/sh
host=\$1; shift
case \$host in $SUBNET.*) k=\$((\${host##*.} - 1));; *) echo "netns-nodes: unknown host \$host" >&2; exit 1;; esac
exec ip netns exec $PREFIX\$k unshare --uts sh -c "hostname node\$k; \$*"
EOF
  chmod +x "$STATE/agent"
  cat > "$STATE/env.sh" <<EOF
export OMPI_MCA_plm_rsh_agent=$STATE/agent
export OMPI_MCA_orte_default_hostfile=$STATE/hostfile
export OMPI_MCA_btl_tcp_if_include=$SUBNET.0/24
export OMPI_MCA_oob_tcp_if_include=$SUBNET.0/24
export OMPI_MCA_btl=self,vader,tcp
# Every node daemon would bind its first rank to core 0: ranks of different "nodes" pinned to
# one core busy-poll against each other and each message waits a scheduler tick (4 ms here).
export OMPI_MCA_hwloc_base_binding_policy=none
# One-sided windows across nodes (the stall watchdog's progress board): Open MPI 4.1's osc/pt2pt
# refuses MPI_THREAD_MULTIPLE and osc/rdma needs RDMA hardware; osc/ucx over UCX's TCP transport works.
export OMPI_MCA_osc=sm,ucx
export OMPI_MCA_mca_base_env_list="UCX_TLS=tcp,self;UCX_LOG_LEVEL=error"
# mpirun notices a node that stopped answering after keepalive_time + intvl * probes seconds
# (Open MPI's default: 300 + 20 * 9 = 8 min, long after every rank has aborted).
export OMPI_MCA_oob_tcp_keepalive_time=5
export OMPI_MCA_oob_tcp_keepalive_intvl=2
export OMPI_MCA_oob_tcp_keepalive_probes=3
EOF
  echo "netns-nodes: $n node(s) of $per slot(s): $(nodes | tr '\n' ' ')(hostfile $STATE/hostfile)"
}

run() {
  [ -f "$STATE/env.sh" ] || die "no nodes: run 'up N' first"
  ip netns exec "${PREFIX}0" unshare --uts bash -c \
    'hostname node0; source "$0"; exec "$@"' "$STATE/env.sh" "$@"
}

link() {  # link up|down K
  local k=${2:?node number}
  ip netns list | grep -q "^$PREFIX$k\b" || die "no node $k"
  ip -n "$PREFIX$k" link set "htv$k" "$1"
  echo "netns-nodes: node$k link $1"
}

down() {
  for ns in $(nodes); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true  # nothing outlives its node
    ip netns del "$ns"
  done
  ip netns list 2>/dev/null | grep -q "^$SWITCH\b" && ip netns del "$SWITCH"
  rm -rf "$STATE"
  echo "netns-nodes: down"
}

status() {
  local found
  found=$(nodes)
  [ -n "$found" ] || { echo "netns-nodes: no nodes"; return 1; }
  for ns in $found; do
    echo "$ns $(ip -n "$ns" -brief addr show | grep htv | awk '{print $2, $3}') pids: $(ip netns pids "$ns" | wc -l)"
  done
}

case ${1:-} in
  up) shift; up "$@" ;;
  run) shift; run "$@" ;;
  cut) link down "${2:-}" ;;
  heal) link up "${2:-}" ;;
  down) down ;;
  status) status ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac

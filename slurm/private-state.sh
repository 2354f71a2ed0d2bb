# Sourced by local-cluster.sh and netns-nodes.sh, which run as root: their state (configuration,
# PID files, the rig's agent script) must live where no other user can plant or swap a file.

# private_state DIR: create DIR with mode 0700, or accept an existing one only if it is a real
# directory of root's that nobody else may write; exit naming the problem otherwise.
private_state() {
  local dir=$1
  mkdir -p -m 700 "$dir"
  if [ -L "$dir" ] || [ "$(stat -c %u "$dir")" != 0 ] || [ $((0$(stat -c %a "$dir") & 022)) != 0 ]; then
    echo "$(basename "$0"): $dir is not a private directory of root (owner $(stat -c %U "$dir"), mode" \
         "$(stat -c %a "$dir")): remove it or choose another" >&2
    exit 1
  fi
}

# ours PID NAME...: whether PID is a running process whose command name is one of NAME
ours() {
  local pid=$1 comm
  shift
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  for name in "$@"; do [ "$comm" = "$name" ] && return 0; done
  return 1
}

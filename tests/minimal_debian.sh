#!/usr/bin/env bash
# README's set-up, verified on a minimal Debian bookworm: a root built by debootstrap (variant
# minbase: no Python, no compiler, no MPI) holding nothing but README's prerequisite, make. The
# checkout's tracked files are copied in and, as root there, `make demo`, `make test` and
# `make test-mpich` run in turn, each timed: everything else they need they must install
# themselves. Times and logs land in results/minimal-debian/.
#
# Run by `make verify-minimal-debian`; not part of `make test` (about 40 minutes on 2 cores).
# Needs root. The root lives in its own mount namespace (proc, sys, dev, a private /run and
# /dev/shm): nothing is left mounted afterwards. It shares this host's network, so this host's
# local Slurm and network-namespace rig are stopped first (the root starts its own on the same
# ports). The host's pip configuration and its local CA certificates (/usr/local/share/
# ca-certificates: a site's proxy, which Debian's ca-certificates package adds to the bundle when
# it is installed) are copied in, and the local folders pip's configuration names are mounted
# read-only (a local index: its parent, which holds the files it links to): PyTorch's CPU wheel
# comes from wherever this host's pip gets it.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=${HPC_TRAIN_DEBIAN_ROOT:-/var/tmp/hpc_train-bookworm}
out=$here/results/minimal-debian
[ "$(id -u)" = 0 ] || { echo "minimal_debian.sh: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
mkdir -p "$out"

mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
}

bash "$here/slurm/local-cluster.sh" down >/dev/null 2>&1 || true
bash "$here/slurm/netns-nodes.sh" down >/dev/null 2>&1 || true

echo "== a fresh minimal bookworm in $root (debootstrap --variant=minbase --include=make)"
rm -rf "$root"
start=$(date +%s)
debootstrap --variant=minbase --include=make bookworm "$root" "$mirror" > "$out/debootstrap.log" 2>&1
cat > "$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
EOF
echo "debootstrap: $(( $(date +%s) - start )) s, $(chroot "$root" dpkg-query -W | wc -l) packages" | tee "$out/summary.txt"

# The checkout (tracked files as they are in the working tree), the host's name service and pip set-up.
mkdir -p "$root/root/hpc_train"
(cd "$here" && git ls-files -z | tar --null -T - -cf -) | tar -xf - -C "$root/root/hpc_train"
cp /etc/resolv.conf /etc/hosts "$root/etc/"
if [ -d /usr/local/share/ca-certificates ]; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi
pip_files=$(ls /etc/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf" 2>/dev/null || true)
binds=()
for f in $pip_files; do
  mkdir -p "$root$(dirname "${f/#$HOME//root}")"; cp "$f" "$root${f/#$HOME//root}"
  for path in $(grep -ohE '(file://)?/[^ ]+' "$f" | sed 's|^file://||'); do
    if [ -f "$path" ]; then mkdir -p "$root$(dirname "$path")"; cp "$path" "$root$path"
    elif [ -d "$path" ]; then
      case $path in */simple|*/simple/) binds+=("$(dirname "${path%/}")") ;; *) binds+=("$path") ;; esac
    fi
  done
done

# One mount namespace for everything below: its mounts vanish with it.
export root binds_list="${binds[*]}"
unshare --mount --propagation private bash -euo pipefail -c '
  # the root a mount point, as / is on a real machine (unshare --mount, which a test uses, needs it)
  mount --bind "$root" "$root"
  mount -t proc proc "$root/proc"
  mount --rbind /sys "$root/sys"
  mount --rbind /dev "$root/dev"
  mount -t tmpfs -o mode=1777,size=4g tmpfs "$root/dev/shm"
  mount -t tmpfs -o mode=755 tmpfs "$root/run"
  for d in $binds_list; do
    # a folder the pip configuration names (a local index, wheels): read-only, at the same path
    mkdir -p "$root$d"; mount --bind "$d" "$root$d"; mount -o remount,bind,ro "$root$d"
  done
  inside() {  # a login-like environment: nothing of this shell leaks in
    chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
      PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin bash -c "cd /root/hpc_train && $1"
  }
  status=0
  for target in demo test test-mpich; do
    start=$(date +%s)
    if inside "make $target" > "'"$out"'/make-$target.log" 2>&1; then result=passed; else result=FAILED; status=1; fi
    echo "make $target: $result in $(( $(date +%s) - start )) s" | tee -a "'"$out"'/summary.txt"
  done
  inside "bash slurm/local-cluster.sh down; bash slurm/netns-nodes.sh down" >/dev/null 2>&1 || true
  exit $status
' || status=$?
# Nothing started in the root outlives the run (a daemon would hold the namespace's mounts).
for proc in /proc/[0-9]*; do
  [ "$(readlink "$proc/root" 2>/dev/null)" = "$root" ] && kill -9 "${proc#/proc/}" 2>/dev/null
done
cat "$out/summary.txt"
exit "${status:-0}"

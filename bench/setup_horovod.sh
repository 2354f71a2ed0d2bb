#!/usr/bin/env bash
# Builds Horovod 0.28.1 (its last release) with its MPI backend against the venv's PyTorch, for
# bench/train_torch.py's "horovod" rows. A benchmark set-up step, never part of `make test`: about
# 10 minutes on 2 cores, once; the wheel is cached beside the h5py one and reinstalled in seconds.
#
# 0.28.1 as published does not build against PyTorch >= 2.1: its torch extension compiles with
# -std=c++14 and PyTorch's headers stop with "C++17 or later compatible compiler is required".
# This script raises the C++ standard to 17 in a patched source tree and says whether that builds.
# usage: bash bench/setup_horovod.sh        (VENV, WHEEL_CACHE as in the Makefile)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}
cache=${WHEEL_CACHE:-$HOME/.cache/hpc_train/wheels}
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input -q)
mkdir -p "$cache"
wheel=$(ls "$cache"/horovod-0.28.1-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  work=$(mktemp -d /tmp/hpc_train_horovod.XXXXXX)
  "${pip[@]}" download --no-deps --no-binary :all: horovod==0.28.1 -d "$work"
  tar xzf "$work/horovod-0.28.1.tar.gz" -C "$work"
  src=$work/horovod-0.28.1
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  "${pip[@]}" install cloudpickle psutil pyyaml packaging cffi
  echo "building horovod 0.28.1 (C++17, MPI, PyTorch only) in $work; log: $work/build.log"
  if ! HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
       HOROVOD_WITHOUT_GLOO=1 HOROVOD_CPU_OPERATIONS=MPI MAKEFLAGS=-j2 \
       "${pip[@]}" wheel --no-deps --no-build-isolation -v "$src" -w "$cache" > "$work/build.log" 2>&1; then
    echo "horovod 0.28.1 did not build with C++17; the first errors:" >&2
    grep -m 20 -E "error|Error" "$work/build.log" >&2 || tail -n 40 "$work/build.log" >&2
    exit 1
  fi
  wheel=$(ls "$cache"/horovod-0.28.1-*.whl | head -n1)
fi
"${pip[@]}" install --no-deps --force-reinstall "$wheel"
"$venv/bin/python" -c "import horovod.torch as hvd; print('horovod', hvd.__version__ if hasattr(hvd, '__version__') else '0.28.1', 'MPI built:', hvd.mpi_built())"

# Two commands do all set-up on a fresh Debian bookworm machine (as root):
#   make demo   - installs everything, trains the demo CNN on 2 ranks (embedded dataset)
#   make test   - installs everything, runs ruff, serial tests, MPI tests at 2 and 4 ranks
# Both are idempotent; a second run skips what is already installed.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip --disable-pip-version-check --no-input -q
# The parallel h5py wheel takes minutes to build: keep it outside the checkout so
# fresh clones on the same machine (CI) install it in seconds.
WHEEL_CACHE ?= $(HOME)/.cache/hpc_train/wheels
H5PY_VERSION ?= 3.16.0
TORCH_VERSION ?= 2.13.0
APT_PACKAGES := openmpi-bin libopenmpi-dev libhdf5-openmpi-dev pkg-config fio \
                slurmctld slurmd slurm-client munge
# Every mpirun is time-boxed: a hang fails fast instead of eating CI.
MPI_TIMEOUT ?= 900
RUFF_ARGS   := --line-length 120 --select E,F,W,B,I,UP,SIM --ignore SIM108 --target-version py311

export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_mpi_yield_when_idle := 1
export OMPI_MCA_btl_base_warn_component_unused := 0
export OMPI_MCA_rmaps_base_oversubscribe := true

.PHONY: setup apt test lint test-serial test-mpi demo bench-train clean

setup: apt $(VENV)/.installed

apt:
	@missing=""
	for p in $(APT_PACKAGES); do
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"
	done
	if [ -n "$$missing" ]; then
	  echo "installing apt packages:$$missing"
	  apt-get update -qq
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null
	fi

$(VENV)/.installed: setup.cfg setup.py pyproject.toml Makefile | apt
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PIP) install 'pip>=24' 'setuptools>=77' wheel
	$(PIP) install 'mpi4py>=4.1,<5' 'numpy>=1.26' tqdm threadpoolctl Cython pkgconfig ml_dtypes \
	    pytest pytest-mpi pytest-timeout hypothesis ruff matplotlib scikit-learn tensorboard
	wheel=$$(ls $(WHEEL_CACHE)/h5py-$(H5PY_VERSION)-*.whl 2>/dev/null | head -n1 || true)
	if [ -z "$$wheel" ]; then
	  echo "building h5py $(H5PY_VERSION) against parallel HDF5 (a few minutes, once)"
	  mkdir -p $(WHEEL_CACHE)
	  CC=mpicc HDF5_MPI=ON HDF5_PKGCONFIG_NAME=hdf5-openmpi \
	    $(PIP) wheel --no-deps --no-build-isolation --no-binary=h5py \
	    h5py==$(H5PY_VERSION) -w $(WHEEL_CACHE)
	  wheel=$$(ls $(WHEEL_CACHE)/h5py-$(H5PY_VERSION)-*.whl | head -n1)
	fi
	$(PIP) install --no-deps --force-reinstall "$$wheel"
	if ! $(PY) -c "import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 1)"; then
	  echo "ERROR: h5py in $(VENV) is not built against parallel HDF5 (h5py.get_config().mpi is False)." >&2
	  echo "       Removing the cached wheel $$wheel; run make again to rebuild it." >&2
	  rm -f "$$wheel"; exit 1
	fi
	# PyTorch for hpc_train.torch, pinned: unpinned, pip would fetch a multi-gigabyte CUDA build
	# (a CPU-only machine elsewhere: --index-url https://download.pytorch.org/whl/cpu)
	$(PIP) install 'torch==$(TORCH_VERSION)'
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

lint: setup
	$(VENV)/bin/ruff check $(RUFF_ARGS) hpc_train kernels io bench tests

test-serial: setup
	$(PY) -m pytest -q --durations=12 -m "not mpi" tests

# 1, 2 and 4 ranks on one node, then pretended nodes of 2 ranks (4 ranks: even nodes,
# 3 ranks: uneven) so that hierarchical allreduce crosses node boundaries.
test-mpi: setup
	bash tests/run_mpi.sh 1 $(MPI_TIMEOUT)
	bash tests/run_mpi.sh 2 $(MPI_TIMEOUT)
	bash tests/run_mpi.sh 4 $(MPI_TIMEOUT)
	HPC_TRAIN_RANKS_PER_NODE=2 bash tests/run_mpi.sh 3 $(MPI_TIMEOUT)
	HPC_TRAIN_RANKS_PER_NODE=2 bash tests/run_mpi.sh 4 $(MPI_TIMEOUT)

test: lint test-serial test-mpi

demo: setup
	timeout -k 10 $(MPI_TIMEOUT) mpirun -n 2 $(VENV)/bin/hpc-train train jobs/demo.toml \
	    --metrics results/demo_metrics.jsonl

# Our NumPy models against PyTorch DDP (PyTorch comes with setup).
bench-train: setup
	timeout -k 10 1800 $(PY) bench/train.py --repeats 5 --steps 30

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

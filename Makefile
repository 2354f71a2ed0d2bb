# Two commands do all set-up on a fresh Debian bookworm machine (as root):
#   make demo   - installs everything, trains the demo CNN on 2 ranks (embedded dataset)
#   make test   - installs everything, runs ruff, serial tests, MPI tests at 1 to 4 ranks
# (and `make test-mpich`: the MPI and whole-job tests again under MPICH, in .venv-mpich).
# The only prerequisite is make itself (apt-get install make): `make verify-minimal-debian`
# checks that on a minimal bookworm root built by debootstrap.
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
APT_PACKAGES := python3-venv python3-dev gcc g++ libc6-dev procps iproute2 \
                openmpi-bin libopenmpi-dev libhdf5-openmpi-dev pkg-config fio \
                slurmctld slurmd slurm-client munge
# What the tests need in every venv (the Open MPI one adds ruff, plotting, TensorBoard and torch;
# scikit-learn is the digits data set).
PY_DEPS     := 'mpi4py>=4.1,<5' 'numpy>=1.26' tqdm threadpoolctl Cython pkgconfig ml_dtypes \
               pytest pytest-mpi pytest-timeout hypothesis scikit-learn
# The MPICH leg (make test-mpich): Debian's MPICH, its parallel HDF5, a venv of its own.
MPICH_VENV  ?= .venv-mpich
MPICH_APT_PACKAGES := mpich libmpich-dev libhdf5-mpich-dev
# Every mpirun is time-boxed: a hang fails fast instead of eating CI.
MPI_TIMEOUT ?= 900
RUFF_ARGS   := --no-cache --line-length 120 --select E,F,W,B,I,UP,SIM --ignore SIM108 --target-version py311

export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_mpi_yield_when_idle := 1
export OMPI_MCA_btl_base_warn_component_unused := 0
export OMPI_MCA_rmaps_base_oversubscribe := true

.PHONY: setup setup-mpich apt apt-mpich test-mpich verify-minimal-debian test lint test-serial test-mpi demo bench-train clean

setup: apt $(VENV)/.installed

# $(call ensure_apt,PACKAGES): install those not installed yet (apt-get update only then)
define ensure_apt
	missing=""
	for p in $(1); do
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"
	done
	if [ -n "$$missing" ]; then
	  echo "installing apt packages:$$missing"
	  apt-get update -qq
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null
	fi
endef

# $(call venv_with_parallel_h5py,VENV,MPI,MPICC,HDF5_PKGCONFIG_NAME): VENV with our Python
# dependencies and h5py built against that MPI's parallel HDF5. The wheel is cached per MPI
# (both builds carry the same file name) and built without pip's cache, which would hand back
# the other MPI's build of the same sdist.
define venv_with_parallel_h5py
	[ -x $(1)/bin/python ] || python3 -m venv $(1)
	pip="$(1)/bin/python -m pip --disable-pip-version-check --no-input -q"
	$$pip install 'pip>=24' 'setuptools>=77' wheel
	$$pip install $(PY_DEPS)
	wheels=$(WHEEL_CACHE)/$(2)
	wheel=$$(ls $$wheels/h5py-$(H5PY_VERSION)-*.whl 2>/dev/null | head -n1 || true)
	if [ -z "$$wheel" ]; then
	  echo "building h5py $(H5PY_VERSION) against $(2)'s parallel HDF5 (a few minutes, once)"
	  mkdir -p $$wheels
	  CC=$(3) MPICC=$(3) HDF5_MPI=ON HDF5_PKGCONFIG_NAME=$(4) \
	    $$pip wheel --no-cache-dir --no-deps --no-build-isolation --no-binary=h5py h5py==$(H5PY_VERSION) -w $$wheels
	  wheel=$$(ls $$wheels/h5py-$(H5PY_VERSION)-*.whl | head -n1)
	fi
	$$pip install --no-deps --force-reinstall "$$wheel"
	if ! $(1)/bin/python -c "import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 1)"; then
	  echo "ERROR: h5py in $(1) is not built against parallel HDF5 (h5py.get_config().mpi is False)." >&2
	  echo "       Removing the cached wheel $$wheel; run make again to rebuild it." >&2
	  rm -f "$$wheel"; exit 1
	fi
endef

apt:
	@$(call ensure_apt,$(APT_PACKAGES))

$(VENV)/.installed: setup.cfg setup.py pyproject.toml Makefile | apt
	$(call venv_with_parallel_h5py,$(VENV),openmpi,mpicc.openmpi,hdf5-openmpi)
	$(PIP) install ruff matplotlib tensorboard
	# PyTorch for hpc_train.torch, pinned: unpinned, pip would fetch a multi-gigabyte CUDA build
	# (a CPU-only machine elsewhere: --index-url https://download.pytorch.org/whl/cpu)
	$(PIP) install 'torch==$(TORCH_VERSION)'
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

apt-mpich:
	@$(call ensure_apt,$(MPICH_APT_PACKAGES))

# mpi4py's wheel carries an MPICH build of its extension that needs MPICH's upstream library
# name, libmpi.so.12; Debian names it libmpich.so.12. The venv gets a library of that name
# (soname) depending on libmpich.so.12, and a .pth file that points MPI4PY_LIBMPI at it in every
# Python of the venv: mpi4py loads it to tell the ABI, and the extension then links to it. No
# system library path changes, so the Open MPI venv loads exactly what it did before. The venv's
# bin/ holds mpirun and mpiexec naming MPICH's Hydra: on PATH first, they are what the tests'
# own launches (and `hpc-train` studies, elastic jobs) start, as on a site where MPICH is the MPI.
$(MPICH_VENV)/.installed: setup.cfg setup.py pyproject.toml Makefile | apt-mpich
	[ -x $(MPICH_VENV)/bin/python ] || python3 -m venv $(MPICH_VENV)
	venv=$$(cd $(MPICH_VENV) && pwd)
	echo 'int hpc_train_libmpi_alias;' > $$venv/lib/libmpi-alias.c
	mpicc.mpich -shared -fPIC -Wl,-soname,libmpi.so.12 -Wl,--no-as-needed \
	    -o $$venv/lib/libmpi.so.12 $$venv/lib/libmpi-alias.c
	site=$$($$venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
	echo "import os; os.environ.setdefault('MPI4PY_LIBMPI', '$$venv/lib/libmpi.so.12')" > $$site/hpc_train_mpich.pth
	for name in mpirun mpiexec; do  # scripts, not links: Hydra finds its proxy beside argv[0]
	  printf '#!/bin/sh\nexec /usr/bin/mpiexec.mpich "$$@"\n' > $$venv/bin/$$name; chmod +x $$venv/bin/$$name
	done
	$(call venv_with_parallel_h5py,$(MPICH_VENV),mpich,mpicc.mpich,hdf5-mpich)
	$$venv/bin/python -c "from mpi4py import MPI; import sys; sys.exit(0 if 'MPICH' in MPI.Get_library_version() else 1)" \
	  || { echo "ERROR: mpi4py in $(MPICH_VENV) did not load MPICH" >&2; exit 1; }
	$(MPICH_VENV)/bin/python -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation -e .
	touch $@

setup-mpich: apt-mpich $(MPICH_VENV)/.installed

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

# The MPICH leg: the MPI-marked tests at 2 ranks (and as 2 pretended nodes of 1 rank, so that
# hierarchical allreduce crosses a node boundary), and the tests that launch whole jobs (training,
# checkpoints, the parameter server, aborts, stalls, mismatches, HDF5 and iobench through MPI-IO)
# under MPICH's Hydra. No more ranks than cores: MPICH 4.0.2's ch4 busy-polls with no way to
# yield, and 3 ranks on 2 cores ran the collectives' tests some 40 times slower.
MPICH_JOB_TESTS := tests/test_checkpoint.py tests/test_train_launch.py tests/test_ps_train.py \
                   tests/test_no_endless_waits.py tests/test_iobench.py tests/test_data_cli.py \
                   tests/test_launch.py::test_exception_on_one_rank_ends_the_job_fast tests/test_launch.py::test_info_json
test-mpich: setup-mpich
	export PATH="$(abspath $(MPICH_VENV))/bin:$$PATH" PYTHON=$(abspath $(MPICH_VENV))/bin/python
	bash tests/run_mpi.sh 2 $(MPI_TIMEOUT)
	HPC_TRAIN_RANKS_PER_NODE=1 bash tests/run_mpi.sh 2 $(MPI_TIMEOUT)
	timeout -k 15 $(MPI_TIMEOUT) $$PYTHON -m pytest -q --durations=8 -m "not mpi" -p no:cacheprovider $(MPICH_JOB_TESTS)

demo: setup
	timeout -k 10 $(MPI_TIMEOUT) mpirun -n 2 $(VENV)/bin/hpc-train train jobs/demo.toml \
	    --metrics results/demo_metrics.jsonl

# README's set-up on a minimal Debian bookworm built by debootstrap (about 40 minutes; not in CI).
verify-minimal-debian:
	bash tests/minimal_debian.sh

# Our NumPy models against PyTorch DDP (PyTorch comes with setup).
bench-train: setup
	timeout -k 10 1800 $(PY) bench/train.py --repeats 5 --steps 30

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

"""Build and load the flag-synchronized small-message allreduce (flagshm.c) on first use.

A Python call costs about as much as MPI's whole small-message allreduce here, so
this one path is C. It is compiled once per machine into a cache directory (no
compiler at install time is needed; without one, `shm` keeps its Python path and
the job says so in the log). Node-local rank 0 compiles while the others wait.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sysconfig
from importlib import resources
from pathlib import Path

log = logging.getLogger("hpc_train.comm")
CACHE_VARIABLE = "HPC_TRAIN_CACHE"
DISABLE_VARIABLE = "HPC_TRAIN_NO_NATIVE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "hpc_train") / "native"


def _compile_command(source: Path, target: Path) -> list[str]:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    include = sysconfig.get_paths()["include"]
    return [compiler, "-O3", "-shared", "-fPIC", "-std=c11", "-I", include, str(source), "-o", str(target)]


def library_path() -> Path:
    """Where the compiled module for this source, Python ABI and platform lives."""
    source = resources.files("hpc_train.comm").joinpath("flagshm.c").read_bytes()
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    tag = hashlib.sha256(source + suffix.encode()).hexdigest()[:16]
    return cache_dir() / f"_flagshm-{tag}{suffix}"


def build() -> Path:
    """Compile flagshm.c unless already built; atomic, so concurrent builders are harmless."""
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with resources.as_file(resources.files("hpc_train.comm").joinpath("flagshm.c")) as source:
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        result = subprocess.run(_compile_command(source, partial), capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"compiling {source} failed:\n{result.stderr.strip()}")
    os.replace(partial, target)
    return target


def load(node_comm):
    """The _flagshm module on every rank of node_comm, or None on every rank (collective)."""
    from mpi4py import MPI

    module, problem = None, None
    if os.environ.get(DISABLE_VARIABLE) == "1":
        problem = f"{DISABLE_VARIABLE}=1"
    else:
        if node_comm.Get_rank() == 0:
            try:
                build()
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
                problem = str(exc)
        node_comm.Barrier()
        if problem is None:
            try:
                spec = importlib.util.spec_from_file_location("_flagshm", library_path())
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            except (ImportError, OSError) as exc:
                module, problem = None, str(exc)
    if node_comm.allreduce(module is not None, op=MPI.LAND):
        return module
    if problem:
        log.warning("small-message shared-memory allreduce unavailable (%s); using the Python path",
                    problem)
    return None

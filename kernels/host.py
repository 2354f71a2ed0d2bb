"""A host build of the CUDA element functions (host.cpp + elementwise.cuh), loaded with ctypes.

The tests run it on random inputs against the references: the arithmetic the GPU
kernels do, checked on a machine without a GPU. Built with g++ into the native cache.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from importlib import resources

from .. import native

SOURCES = ("host.cpp", "elementwise.cuh")


class HostBuildError(RuntimeError):
    """g++ is missing or the host build failed (the message says which)."""


@functools.cache
def library() -> ctypes.CDLL:
    folder = resources.files("hpc_train.kernels")
    digest = hashlib.sha256(b"".join(folder.joinpath(s).read_bytes() for s in SOURCES)).hexdigest()[:16]
    target = native.cache_dir() / f"kernels-host-{digest}.so"
    if not target.exists():
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if compiler is None:
            raise HostBuildError("no C++ compiler (g++, c++ or $CXX) on PATH")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        with resources.as_file(folder) as path:
            command = [compiler, "-O2", "-shared", "-fPIC", "-std=c++14", "-Wall", "-Werror",
                       "-ffp-contract=off", "-I", str(path), str(path / "host.cpp"), "-o", str(partial)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise HostBuildError(f"{' '.join(command)} failed:\n{result.stderr.strip()}")
        os.replace(partial, target)
    return ctypes.CDLL(str(target))

"""A host build of the CUDA element functions (host.cpp + elementwise.cuh), loaded with ctypes.

The tests run it on random inputs against the references: the arithmetic the GPU
kernels do, checked on a machine without a GPU. Built with g++ into the native cache.
"""

from __future__ import annotations

import ctypes
import functools
from importlib import resources

from .. import native

SOURCES = ("host.cpp", "elementwise.cuh")


class HostBuildError(RuntimeError):
    """g++ is missing or the host build failed (the message says which)."""


@functools.cache
def library() -> ctypes.CDLL:
    folder = resources.files("hpc_train.kernels")
    try:
        command = [native.compiler("CXX", ("g++", "c++")), "-O2", "-shared", "-fPIC", "-std=c++14", "-Wall",
                   "-Werror", "-ffp-contract=off"]
        with resources.as_file(folder) as path:
            target = native.cached_build("kernels-host", b"".join(folder.joinpath(s).read_bytes() for s in SOURCES),
                                         command, ["-I", str(path), str(path / "host.cpp")], ".so")
    except native.NativeUnavailable as exc:
        raise HostBuildError(str(exc)) from None
    return ctypes.CDLL(str(target))

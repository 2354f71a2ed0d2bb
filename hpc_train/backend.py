"""Array backends: `xp` is numpy or cupy per array, and what MPI may touch directly.

MPI can read device memory only when the library is CUDA-aware; otherwise device
arrays are staged through reusable pinned host buffers. mpi4py does not order
MPI calls after pending CUDA work, so `sync_device()` is called before any MPI call
on device memory.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np

from . import settings

CUDA_AWARE_VARIABLE = settings.VARIABLES["cuda_aware"].name
# DLPack device types (dlpack.h): memory MPI can only reach if CUDA-aware.
_DLPACK_DEVICE_TYPES = {2: "cuda", 13: "cuda_managed", 10: "rocm"}


@functools.cache
def cupy_module():
    """The cupy module, or None where it is not installed or has no usable GPU."""
    try:
        import cupy
    except Exception:  # ImportError, or a CUDA runtime that fails to load
        return None
    return cupy


def is_device_array(a) -> bool:
    """True for arrays in GPU memory (CuPy, or any __cuda_array_interface__ / DLPack device)."""
    if isinstance(a, np.ndarray):
        return False
    if hasattr(a, "__cuda_array_interface__"):
        return True
    dlpack_device = getattr(a, "__dlpack_device__", None)
    if dlpack_device is not None:
        return dlpack_device()[0] in _DLPACK_DEVICE_TYPES
    return False


def xp_of(a):
    """numpy or cupy: the module whose functions operate on `a` where it lives."""
    if is_device_array(a):
        cupy = cupy_module()
        if cupy is None:
            raise TypeError(
                f"{type(a).__name__} lives in GPU memory but cupy is not installed "
                "(pip install 'hpc_train[gpu]')"
            )
        return cupy
    return np


def as_array(a):
    """A numpy or cupy view of `a` (no copy) for anything array-like or DLPack-capable."""
    if isinstance(a, np.ndarray):
        return a
    xp = xp_of(a)
    if xp is not np:
        return a if isinstance(a, xp.ndarray) else xp.from_dlpack(a)
    if hasattr(a, "__dlpack__") and not hasattr(a, "__array_interface__"):
        return np.from_dlpack(a)
    return np.asarray(a)


def sync_device(a) -> None:
    """Wait for queued GPU work on the current stream before MPI reads or writes `a`."""
    if is_device_array(a):
        xp_of(a).cuda.get_current_stream().synchronize()


@dataclass(frozen=True)
class CudaAwareness:
    aware: bool
    how: str  # how it was decided, for `hpc-train info`


@functools.cache
def cuda_awareness() -> CudaAwareness:
    """Whether the MPI library accepts device pointers, and how we know."""
    override = settings.current().cuda_aware
    if override is not None:
        return CudaAwareness(override, f"environment {CUDA_AWARE_VARIABLE}={int(override)}")
    from mpi4py import MPI

    library = MPI.Get_library_version()
    if library.startswith("Open MPI"):
        return _open_mpi_cuda_support()
    if "MVAPICH" in library:
        aware = os.environ.get("MV2_USE_CUDA") == "1"
        return CudaAwareness(aware, "MVAPICH: MV2_USE_CUDA")
    if "MPICH" in library:
        aware = os.environ.get("MPIR_CVAR_ENABLE_GPU", "1") != "0" and "cuda" in library.lower()
        return CudaAwareness(aware, "MPICH: library version string and MPIR_CVAR_ENABLE_GPU")
    return CudaAwareness(False, f"unknown MPI library ({library.splitlines()[0]}): assumed not")


def _open_mpi_cuda_support() -> CudaAwareness:
    ompi_info = shutil.which("ompi_info")
    if ompi_info is None:
        return CudaAwareness(False, "Open MPI without ompi_info on PATH: assumed not")
    try:
        out = subprocess.run(
            [ompi_info, "--parsable", "--all"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CudaAwareness(False, f"ompi_info failed ({exc}): assumed not")
    key = "mpi_built_with_cuda_support:value:"
    for line in out.splitlines():
        if key in line:
            return CudaAwareness(line.rsplit(":", 1)[1] == "true", f"ompi_info {key}{line.rsplit(':', 1)[1]}")
    return CudaAwareness(False, "ompi_info lists no mpi_built_with_cuda_support: assumed not")


class HostStaging:
    """Grow-only pinned host buffers for device arrays when MPI is not CUDA-aware."""

    def __init__(self):
        self._buffers: dict[str, np.ndarray] = {}

    def host_buffer(self, slot: str, nbytes: int) -> np.ndarray:
        """A pinned uint8 buffer of at least nbytes, reused across calls for `slot`."""
        buf = self._buffers.get(slot)
        if buf is None or buf.nbytes < nbytes:
            cupy = cupy_module()
            capacity = max(nbytes, 2 * (buf.nbytes if buf is not None else 0))
            mem = cupy.cuda.alloc_pinned_memory(capacity)
            buf = np.frombuffer(mem, dtype=np.uint8, count=capacity)
            self._buffers[slot] = buf
        return buf[:nbytes]

    def to_host(self, device_array, slot: str) -> np.ndarray:
        """Copy a contiguous device array into the pinned buffer `slot`; returns the host view."""
        host = self.host_buffer(slot, device_array.nbytes).view(device_array.dtype)
        host = host.reshape(device_array.shape)
        device_array.get(out=host)
        return host

    def to_device(self, host: np.ndarray, device_array) -> None:
        """Copy host data back into the device array (synchronously)."""
        device_array.set(host)


staging = HostStaging()

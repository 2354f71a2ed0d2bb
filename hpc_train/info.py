"""`hpc-train info`: what this job sees of MPI, the node layout, GPUs and the I/O stack."""

from __future__ import annotations

import shutil
import socket
import subprocess

import numpy as np

from . import backend, runtime
from .comm import auto


def gpu_devices() -> list[str]:
    """Names of visible GPUs, through CuPy where installed, else nvidia-smi."""
    cupy = backend.cupy_module()
    if cupy is not None:
        try:
            count = cupy.cuda.runtime.getDeviceCount()
            return [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode() for i in range(count)]
        except Exception as exc:  # CUDA driver missing or broken: say so
            return [f"none usable ({type(exc).__name__}: {exc})"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def collect() -> dict:
    """The job's view of itself (collective: every rank contributes its host)."""
    from mpi4py import MPI

    from .io import h5py_status

    rt = runtime.init()
    topo = rt.topology
    hosts = rt.world.gather(socket.gethostname(), root=0)
    thread_names = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
                    MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
    cuda = backend.cuda_awareness()
    cupy = backend.cupy_module()
    version = MPI.Get_version()
    return {
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
        "mpi_standard": f"{version[0]}.{version[1]}",
        "mpi4py": __import__("mpi4py").__version__,
        "thread_level": thread_names.get(MPI.Query_thread(), str(MPI.Query_thread())),
        "world_size": rt.world.Get_size(),
        "nodes": topo.num_nodes,
        "ranks_per_node": list(topo.node_sizes),
        "pretended_nodes": topo.pretended,
        "auto_table": auto.topology_key(topo),
        "hosts": sorted(set(hosts)) if hosts else [],
        "cuda_aware": cuda.aware,
        "cuda_aware_how": cuda.how,
        **{f"h5py_{k}" if k != "h5py" else "h5py": v for k, v in h5py_status().items()},
        "numpy": np.__version__,
        "cupy": cupy.__version__ if cupy is not None else None,
        "gpus": gpu_devices(),
    }


def format_table(info: dict) -> str:
    width = max(len(k) for k in info)
    lines = []
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value)) or "none"
        lines.append(f"{key:<{width}}  {'not installed' if value is None else value}")
    return "\n".join(lines)

"""The CUDA kernels of kernels.cu, compiled by CuPy (NVRTC) on first use and launched on CuPy arrays.

Only float32 data runs here (what the kernels are written for); the dispatch in
hpc_train.kernels sends everything else to the references.
"""

from __future__ import annotations

import functools
from importlib import resources

THREADS = 256
MAX_BLOCKS = 4096


@functools.cache
def module():
    import cupy

    folder = resources.files("hpc_train.kernels")
    header = folder.joinpath("elementwise.cuh").read_text()
    source = folder.joinpath("kernels.cu").read_text().replace('#include "elementwise.cuh"', header)
    return cupy.RawModule(code=source, options=("--std=c++14",))


def launch(name: str, n: int, *args) -> None:
    """Run kernel `name` over n elements (grid-stride loop: any n fits the capped grid)."""
    if n == 0:
        return
    blocks = min(MAX_BLOCKS, (n + THREADS - 1) // THREADS)
    module().get_function(name)((blocks,), (THREADS,), args)

"""Torch tensors as the arrays our collectives take, without copies, and back.

CPU tensors become NumPy views (`Tensor.numpy()` shares memory; bfloat16, which
NumPy lacks, goes through an int16 view as ml_dtypes' bfloat16). CUDA tensors
become CuPy arrays through DLPack, after torch's current stream is synchronized:
MPI reads device memory outside any stream, and the kernels that produced the
tensor were queued on torch's stream, not CuPy's.
"""

from __future__ import annotations

import numpy as np
import torch

from ..comm.ops import bfloat16_dtype


def as_array(tensor: torch.Tensor):
    """The tensor's memory as a NumPy (CPU) or CuPy (CUDA) array: no copy."""
    tensor = tensor.detach()
    if tensor.device.type == "cuda":
        import cupy

        torch.cuda.current_stream(tensor.device).synchronize()
        return cupy.from_dlpack(tensor)
    if tensor.device.type != "cpu":
        raise TypeError(f"hpc_train.torch reduces CPU and CUDA tensors, not {tensor.device.type} ones")
    if tensor.dtype == torch.bfloat16:
        bf16 = bfloat16_dtype()
        if bf16 is None:
            raise TypeError("bfloat16 tensors need ml_dtypes (pip install ml_dtypes)")
        return tensor.view(torch.int16).numpy().view(bf16)
    return tensor.numpy()


def as_tensor(array, device: torch.device | None = None) -> torch.Tensor:
    """A NumPy or CuPy array as a torch tensor sharing its memory (bfloat16 included)."""
    if isinstance(array, np.ndarray):
        if array.dtype == bfloat16_dtype():
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        tensor = torch.from_numpy(array)
    else:
        tensor = torch.from_dlpack(array)
    return tensor if device is None else tensor.to(device)


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype a torch dtype's arrays have here."""
    return as_array(torch.empty(0, dtype=dtype)).dtype


def tensor_batches(device: str | torch.device = "cpu"):
    """A batch converter for `HDF5Loader(output=...)`: (images, labels) as torch tensors. On the CPU
    they share the loader's arrays (no copy); for a CUDA device they are pinned, then copied on a side
    stream that is finished before the batch is handed over (the loader's prefetch thread runs this)."""
    device = torch.device(device)
    if device.type == "cpu":
        return lambda images, labels: (torch.from_numpy(images), torch.from_numpy(labels))
    stream = torch.cuda.Stream(device)

    def to_device(images, labels):
        with torch.cuda.stream(stream):
            out = tuple(torch.from_numpy(a).pin_memory().to(device, non_blocking=True) for a in (images, labels))
        stream.synchronize()
        return out

    return to_device

"""hpc_train.kernels: the device path's CUDA kernels and their NumPy references, behind one dispatch.

Each function here runs the CUDA kernel of kernels.cu (loaded with cupy.RawModule)
when its arrays are contiguous float32 CuPy arrays, and the reference of
reference.py otherwise (NumPy arrays: the CPU path; other dtypes on the GPU).
The per-element logic is in elementwise.cuh, shared with a host build
(host.py) that the tests check against the references on a CPU-only machine.
"""

from __future__ import annotations

import numpy as np

from . import reference

_F32 = np.dtype(np.float32)


def _on_device(*arrays) -> bool:
    """True when every array is a contiguous CuPy array and the data arrays are float32."""
    if any(type(a).__module__.split(".")[0] != "cupy" for a in arrays if a is not None):
        return False
    return all(a is None or a.flags.c_contiguous for a in arrays)


def _launch(name, n, *args):
    from . import device

    device.launch(name, n, *args)


def sgd_update(w, grad, buf, lr, momentum, weight_decay=0.0, nesterov=False, first=False) -> None:
    """SGD (momentum, Nesterov, weight decay) in place on w and buf."""
    if _on_device(w, grad, buf) and w.dtype == _F32:
        _launch("sgd_f32", w.size, w, grad, buf if buf is not None else w, np.int64(w.size), np.float32(lr),
                np.float32(momentum), np.float32(weight_decay), np.int32(nesterov), np.int32(first))
    else:
        reference.sgd(w, grad, buf, lr, momentum, weight_decay, nesterov, first)


def adam_update(w, grad, m, v, lr, beta1, beta2, eps, weight_decay=0.0, decoupled=False, step=1) -> None:
    """Adam / AdamW in place on w, m and v; step counts from 1."""
    if _on_device(w, grad, m, v) and w.dtype == _F32:
        _launch("adam_f32", w.size, w, grad, m, v, np.int64(w.size), *adam_constants(
            lr, beta1, beta2, eps, weight_decay, decoupled, step))
    else:
        reference.adam(w, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step)


def adam_constants(lr, beta1, beta2, eps, weight_decay, decoupled, step) -> tuple:
    """The float32 scalars adam_f32 takes after n, computed in double as the reference does."""
    return tuple(np.float32(c) for c in (
        beta1, beta2, 1 - beta1, 1 - beta2, eps, 0.0 if decoupled else weight_decay,
        1 - lr * weight_decay if decoupled else 1.0, lr / (1 - beta1**step), 1 - beta2**step))


def _wire_kind(dst) -> str:
    """'f16' or 'bf16': CuPy has no bfloat16, so a device bf16 buffer is uint16."""
    if dst.dtype == np.float16:
        return "f16"
    if dst.dtype == np.uint16 or dst.dtype.name == "bfloat16":
        return "bf16"
    raise TypeError(f"pack/unpack: wire dtype {dst.dtype} is neither float16 nor bfloat16")


def pack(src, dst, scale: float = 1.0) -> None:
    """dst = src * scale in float16 / bfloat16 (round to nearest even, overflow to inf)."""
    if _on_device(src, dst) and src.dtype == _F32:
        _launch(f"pack_{_wire_kind(dst)}", src.size, src, dst, np.int64(src.size), np.float32(scale))
    else:
        reference.pack(src, dst, scale)


def unpack(src, dst, scale: float = 1.0) -> None:
    """dst (float32) = src * scale, src in float16 / bfloat16."""
    if _on_device(src, dst) and dst.dtype == _F32:
        _launch(f"unpack_{_wire_kind(src)}", src.size, src, dst, np.int64(src.size), np.float32(scale))
    else:
        reference.unpack(src, dst, scale)


def _pointer_table(arrays):
    import cupy

    pointers = cupy.asarray(np.array([a.data.ptr for a in arrays], np.uint64))
    offsets = cupy.asarray(np.cumsum([0] + [a.size for a in arrays], dtype=np.int64))
    return pointers, offsets


def bucket_pack(arrays, out) -> None:
    """Many arrays into one flat buffer with one launch on device."""
    arrays = list(arrays)
    if arrays and _on_device(out, *arrays) and all(a.dtype == _F32 for a in [out, *arrays]):
        pointers, offsets = _pointer_table(arrays)
        _launch("bucket_pack_f32", out.size, pointers, offsets, np.int32(len(arrays)), out)
    else:
        reference.bucket_pack(arrays, out)


def bucket_unpack(flat, arrays) -> None:
    """The inverse of bucket_pack."""
    arrays = list(arrays)
    if arrays and _on_device(flat, *arrays) and all(a.dtype == _F32 for a in [flat, *arrays]):
        pointers, offsets = _pointer_table(arrays)
        _launch("bucket_unpack_f32", flat.size, flat, pointers, offsets, np.int32(len(arrays)))
    else:
        reference.bucket_unpack(flat, arrays)


def elementwise_sum(a, b, out=None):
    """out = a + b: the reduction step of the ring on device."""
    if out is None:
        out = a * 0
    if _on_device(a, b, out) and a.dtype == b.dtype == out.dtype == _F32:
        _launch("sum_f32", out.size, a, b, out, np.int64(out.size))
    else:
        reference.elementwise_sum(a, b, out)
    return out

"""Reduction operations and the dtypes they accept.

Our own algorithms move raw bytes and reduce with the array library's ufuncs, so
they take every numeric dtype, float16 and bfloat16 included. MPI has no half
types, so the `mpi` algorithm reduces those in float32 and rounds once at the end.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReduceOp:
    name: str
    ufunc_name: str  # attribute of numpy / cupy
    mpi_name: str  # attribute of mpi4py.MPI
    scale_by_size: bool = False  # "mean" = sum, then divide by the number of ranks

    def ufunc(self, xp=np):
        """The element-wise reduction f(a, b, out=...): on device, sums run the kernels' sum_f32."""
        if xp is not np and self.ufunc_name == "add":
            from .. import kernels

            return kernels.elementwise_sum
        return getattr(xp, self.ufunc_name)

    def mpi(self):
        from mpi4py import MPI

        return getattr(MPI, self.mpi_name)


OPS = {
    "sum": ReduceOp("sum", "add", "SUM"),
    "mean": ReduceOp("mean", "add", "SUM", scale_by_size=True),
    "max": ReduceOp("max", "maximum", "MAX"),
    "min": ReduceOp("min", "minimum", "MIN"),
    "prod": ReduceOp("prod", "multiply", "PROD"),
}


def reduce_op(name: str) -> ReduceOp:
    try:
        return OPS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown reduction op {name!r}; expected one of {sorted(OPS)}") from None


def bfloat16_dtype():
    """ml_dtypes' bfloat16, or None where ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


@functools.cache
def half_dtypes() -> frozenset:
    """16-bit float dtypes that MPI cannot reduce natively."""
    halves = {np.dtype(np.float16)}
    bf16 = bfloat16_dtype()
    if bf16 is not None:
        halves.add(bf16)
    return frozenset(halves)


@functools.cache
def validate(dtype: np.dtype, op: ReduceOp) -> None:
    """Raise TypeError for dtypes this op cannot reduce (cached: called per collective)."""
    if dtype in half_dtypes():
        return
    if dtype.kind not in "iufc":
        raise TypeError(f"cannot reduce dtype {dtype}: only numeric dtypes are supported")
    if dtype.kind == "c" and op.name in ("max", "min"):
        raise TypeError(f"op {op.name!r} is not defined for complex dtype {dtype}")


def mpi_wire_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype MPI reduces `dtype` in: float32 for 16-bit floats, else itself."""
    return np.dtype(np.float32) if dtype in half_dtypes() else dtype


def scale_mean(result, size: int, xp=np) -> None:
    """Turn a sum into a mean in place; integer means truncate toward zero."""
    xp.divide(result, size, out=result, casting="unsafe")

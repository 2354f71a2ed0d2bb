"""Collectives on torch tensors: hpc_train's algorithms, torch tensors in and out.

Every call returns a tensor of the input's dtype (bfloat16 and float16 included),
shape and device. Contiguous CPU tensors are reduced where they lie: `out=t` (or
Horovod's `allreduce_(t)`) reduces t in place with no copy. Horovod's names and
argument spellings are accepted beside ours (`root_rank` or `root`, `average=`,
`op=Average`, `compression=Compression.fp16`, `prescale_factor`/`postscale_factor`).
"""

from __future__ import annotations

import torch

from .. import comm
from ..blocks import partition
from ..runtime import rank, size
from .tensors import as_array, as_tensor

Average, Sum, Min, Max, Product = "average", "sum", "min", "max", "product"
_OPS = {Average: "mean", "mean": "mean", Sum: "sum", Min: "min", Max: "max", Product: "prod", "prod": "prod"}


class Compression:
    """What a floating-point tensor is sent as (Horovod's spelling): `Compression.fp16` halves the
    bytes on the wire; the sum is pre-divided by the rank count so that it stays in range."""

    none = None
    fp16 = "fp16"
    bf16 = "bf16"


_WIRE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def reduce_op(op: str | None, average: bool | None = None) -> str:
    """Our op name for a Horovod or hpc_train op (default: the average, as in Horovod)."""
    if average is not None:
        return "mean" if average else "sum"
    if op is None:
        return "mean"
    if op not in _OPS:
        raise ValueError(f"op {op!r}: expected one of {sorted(_OPS)}")
    return _OPS[op]


def wire_dtype(compression, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a tensor of `dtype` travels as, or None to send it as it is."""
    if compression is None:
        return None
    if compression not in _WIRE:
        raise ValueError(f"compression {compression!r}: expected None, {Compression.fp16!r} or {Compression.bf16!r}")
    return _WIRE[compression] if dtype.is_floating_point and dtype.itemsize > 2 else None


class Handle:
    """A collective under way on the background engine: `wait()` (or `synchronize(handle)`) returns
    its tensor. The input (and `out`) must not be modified until then."""

    def __init__(self, handle, finish):
        self._handle, self._finish = handle, finish
        self.name = handle.name

    def done(self) -> bool:
        return self._handle.done()

    def wait(self) -> torch.Tensor:
        self._handle.wait()
        return self._finish()


def _plan(tensor, spec, out, compression, prescale_factor, postscale_factor, name):
    """(array to reduce, our op, out array, finish) for op `spec` (our name): reduce in place on `out`
    when nothing is converted, else on a contiguous copy converted to the wire dtype, then copied
    into the result."""
    if out is not None and (out.shape != tensor.shape or out.dtype != tensor.dtype or out.device != tensor.device):
        raise ValueError(f"allreduce {name}: out is {tuple(out.shape)} {out.dtype} on {out.device}, the input "
                         f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")
    wire = wire_dtype(compression, tensor.dtype)
    result = torch.empty_like(tensor, memory_format=torch.contiguous_format) if out is None else out
    if wire is None and prescale_factor == 1 and result.is_contiguous() and tensor.device.type == "cpu":
        def finish():
            if postscale_factor != 1:
                result.mul_(postscale_factor)
            return result

        send = as_array(tensor)  # in place: the very same array, which MPI and our algorithms recognize as such
        return send, spec, send if result is tensor else as_array(result), finish
    send = tensor.detach().contiguous() * prescale_factor if prescale_factor != 1 else tensor.detach().clone()
    if wire is not None and spec == "mean":  # a sum of pre-divided values stays in the narrow range
        send, spec = send / size(), "sum"
    send = send.to(wire or tensor.dtype).contiguous()

    def finish():
        converted = send.to(tensor.dtype)
        if postscale_factor != 1:
            converted.mul_(postscale_factor)
        return result.copy_(converted)

    array = as_array(send)
    return array, spec, array, finish


def allreduce_async(tensor: torch.Tensor, op: str | None = None, *, out: torch.Tensor | None = None,
                    name: str = "", average: bool | None = None, compression=None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0, algorithm: str = "auto") -> Handle:
    """Start reducing `tensor` over all ranks on the background engine (default op: average)."""
    send, spec, result, finish = _plan(tensor, reduce_op(op, average), out, compression, prescale_factor,
                                       postscale_factor, name)
    return Handle(comm.allreduce_async(send, spec, algorithm, out=result, name=name), finish)


def allreduce(tensor: torch.Tensor, op: str | None = None, *, out: torch.Tensor | None = None, name: str = "",
              average: bool | None = None, compression=None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, algorithm: str = "auto") -> torch.Tensor:
    """`tensor` reduced over all ranks (default op: average), a new tensor or `out`."""
    send, spec, result, finish = _plan(tensor, reduce_op(op, average), out, compression, prescale_factor,
                                       postscale_factor, name)
    comm.allreduce(send, spec, algorithm, out=result, name=name)
    return finish()


def allreduce_(tensor: torch.Tensor, op: str | None = None, **kwargs) -> torch.Tensor:
    """Horovod's in-place spelling of `allreduce(tensor, out=tensor)`."""
    return allreduce(tensor, op, out=tensor, **kwargs)


def allreduce_async_(tensor: torch.Tensor, op: str | None = None, **kwargs) -> Handle:
    """Horovod's in-place spelling of `allreduce_async(tensor, out=tensor)`."""
    return allreduce_async(tensor, op, out=tensor, **kwargs)


def synchronize(handle: Handle) -> torch.Tensor:
    """Wait for an asynchronous collective; its tensor."""
    return handle.wait()


def poll(handle: Handle) -> bool:
    """Whether an asynchronous collective has finished."""
    return handle.done()


def allgather(tensor: torch.Tensor, name: str = "") -> torch.Tensor:
    """Every rank's tensor concatenated along dimension 0 (first dimensions may differ)."""
    gathered = comm.allgather(as_array(tensor.contiguous()), name=name)
    return as_tensor(gathered, tensor.device).reshape(-1, *tensor.shape[1:])


def reduce_scatter(tensor: torch.Tensor, op: str | None = None, name: str = "") -> torch.Tensor:
    """This rank's rows of the reduction over all ranks (default op: average): dimension 0 split as
    evenly as it goes, the first ranks taking the remainder (Horovod's `reducescatter`)."""
    rows, offsets = partition(tensor.shape[0], size())
    row = tensor[0].numel() if tensor.dim() else 1
    mine = comm.reduce_scatter(as_array(tensor.contiguous()), reduce_op(op), counts=[r * row for r in rows],
                               name=name)
    return as_tensor(mine, tensor.device).reshape(rows[rank()], *tensor.shape[1:])


reducescatter = reduce_scatter


def broadcast_(tensor: torch.Tensor, root_rank: int = 0, name: str = "", *, root: int | None = None) -> torch.Tensor:
    """Root's tensor copied into `tensor` on every rank (in place)."""
    root = root_rank if root is None else root
    if tensor.is_contiguous() and tensor.device.type == "cpu":
        comm.broadcast(as_array(tensor), root, name=name)
        return tensor
    staged = tensor.detach().contiguous().clone()
    comm.broadcast(as_array(staged), root, name=name)
    with torch.no_grad():
        return tensor.copy_(staged)


def broadcast(tensor: torch.Tensor, root_rank: int = 0, name: str = "", *, root: int | None = None) -> torch.Tensor:
    """Root's tensor, as a new tensor on every rank."""
    return broadcast_(tensor.detach().clone(), root_rank, name, root=root)

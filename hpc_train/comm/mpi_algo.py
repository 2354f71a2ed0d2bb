"""The `mpi` algorithm: the MPI library's own collectives, the baseline we measure against."""

from __future__ import annotations

import numpy as np

from .ops import ReduceOp, mpi_wire_dtype


def allreduce(group, send, recv, op: ReduceOp, xp=np) -> None:
    """recv = reduce(send) over the group; send may be recv (in place)."""
    from mpi4py import MPI

    wire = mpi_wire_dtype(send.dtype)
    if wire != send.dtype:  # 16-bit floats: reduce in float32, round once
        wide = group.scratch("mpi-wide", send.size, wire, xp)
        wide[...] = send
        group.comm.Allreduce(MPI.IN_PLACE, wide, op=op.mpi())
        recv[...] = wide
    elif send is recv:
        group.comm.Allreduce(MPI.IN_PLACE, recv, op=op.mpi())
    else:
        group.comm.Allreduce(send, recv, op=op.mpi())


def reduce_scatter(group, send, recv, counts, op: ReduceOp, xp=np) -> None:
    """recv = this rank's block (sizes `counts`) of reduce(send)."""
    wire = mpi_wire_dtype(send.dtype)
    if wire != send.dtype:
        wide_send = group.scratch("mpi-wide", send.size, wire, xp)
        wide_send[...] = send
        wide_recv = group.scratch("mpi-wide-recv", recv.size, wire, xp)
        group.comm.Reduce_scatter(wide_send, wide_recv, list(counts), op=op.mpi())
        recv[...] = wide_recv
    else:
        group.comm.Reduce_scatter(send, recv, list(counts), op=op.mpi())


def allgather(group, send, recv, counts, offsets) -> None:
    """recv = concatenation of every rank's send (block sizes `counts`), moved as bytes."""
    from mpi4py import MPI

    itemsize = send.dtype.itemsize
    group.comm.Allgatherv(
        [send.view(np.uint8), MPI.BYTE],
        [recv.view(np.uint8), ([c * itemsize for c in counts], [o * itemsize for o in offsets]), MPI.BYTE],
    )


def broadcast(group, buf, root: int) -> None:
    from mpi4py import MPI

    group.comm.Bcast([buf.view(np.uint8), MPI.BYTE], root=root)

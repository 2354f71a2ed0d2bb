"""Ring collectives over point-to-point messages (Baidu / MPICH ring).

The array is split into p blocks (remainder spread over the first blocks).
Reduce-scatter: p-1 steps; at step i rank r sends block (r-i-1) to its right
neighbour, receives block (r-i-2) from its left one and adds its own share, so
that it ends holding block r fully reduced. Allgather: p-1 steps; at step i it
sends block (r-i) and receives block (r-i-1). Each rank sends and receives
2n(p-1)/p bytes: bandwidth-optimal. Every reduce-scatter step is cut into
segments; segment j+1 is in flight while segment j is reduced, so transfer and
reduction overlap and the received data is reduced while still in cache.
"""

from __future__ import annotations

import numpy as np

from .. import settings
from ..backend import sync_device
from ..blocks import partition
from .ops import ReduceOp

_TAG = 0x52494E47 % 32767  # "RING"


def _bytes(a):
    from mpi4py import MPI

    return [a.view(np.uint8), MPI.BYTE]


def reduce_scatter(group, comm, send, acc, op: ReduceOp, xp=np, counts=None) -> None:
    """Ring reduce-scatter: afterwards acc[block r] holds the reduction of block r.

    Blocks are `counts` (default: `partition`). `acc` (same length as `send`, may
    be `send` itself) also receives the partial sums of the other blocks along the way.
    """
    from mpi4py import MPI

    p, r = comm.Get_size(), comm.Get_rank()
    if counts is None:
        counts, offsets = partition(send.size, p)
    else:
        offsets = [sum(counts[:q]) for q in range(p)]
    ufunc = op.ufunc(xp)
    right, left = (r + 1) % p, (r - 1) % p
    # bytes per pipelined segment: tunable (HPC_TRAIN_RING_SEGMENT), the best value depends on caches and transport
    seg = max(1, settings.current().ring_segment // send.dtype.itemsize)
    tmp = group.scratch("ring-recv", 2 * seg, send.dtype, xp)

    def block(a, i):
        return a[offsets[i] : offsets[i] + counts[i]]

    for step in range(p - 1):
        send_block = block(send if step == 0 else acc, (r - step - 1) % p)
        recv_i = (r - step - 2) % p
        mine, target = block(send, recv_i), block(acc, recv_i)
        sync_device(send_block)
        nsend = -(-send_block.size // seg)
        nrecv = -(-target.size // seg)
        sends = [comm.Isend(_bytes(send_block[j * seg : (j + 1) * seg]), right, _TAG) for j in range(nsend)]
        slots = [tmp[:seg], tmp[seg:]]
        pending = comm.Irecv(_bytes(slots[0][: min(seg, target.size)]), left, _TAG) if nrecv else None
        for j in range(nrecv):
            lo, hi = j * seg, min((j + 1) * seg, target.size)
            current = pending
            if j + 1 < nrecv:
                nxt = slots[(j + 1) % 2][: min(seg, target.size - hi)]
                pending = comm.Irecv(_bytes(nxt), left, _TAG)
            current.Wait()
            ufunc(mine[lo:hi], slots[j % 2][: hi - lo], out=target[lo:hi])
        MPI.Request.Waitall(sends)


def allgather_blocks(comm, buf, counts, offsets, first_owned: int = 0) -> None:
    """Ring allgather in place: rank r starts with block (r + first_owned) of buf and ends with all."""
    p, r = comm.Get_size(), comm.Get_rank()
    right, left = (r + 1) % p, (r - 1) % p
    sync_device(buf)
    for step in range(p - 1):
        s = (r + first_owned - step) % p
        q = (r + first_owned - step - 1) % p
        comm.Sendrecv(
            _bytes(buf[offsets[s] : offsets[s] + counts[s]]), right, _TAG,
            _bytes(buf[offsets[q] : offsets[q] + counts[q]]), left, _TAG,
        )


def allreduce(group, send, recv, op: ReduceOp, xp=np, comm=None) -> None:
    """Ring allreduce = reduce-scatter + allgather; send may be recv."""
    comm = comm or group.comm
    if comm.Get_size() == 1:
        if recv is not send:
            recv[...] = send
        return
    reduce_scatter(group, comm, send, recv, op, xp)
    counts, offsets = partition(send.size, comm.Get_size())
    allgather_blocks(comm, recv, counts, offsets)


def reduce_scatter_blocks(group, send, recv, counts, op: ReduceOp, xp=np) -> None:
    """recv = this rank's block (sizes `counts`) of reduce(send): the ring reduce-scatter in a scratch buffer."""
    acc = group.scratch("rs-acc", send.size, send.dtype, xp)
    reduce_scatter(group, group.comm, send, acc, op, xp, counts=counts)
    start = sum(counts[: group.rank])
    recv[...] = acc[start : start + counts[group.rank]]


def allgather_into(group, send, recv, counts, offsets) -> None:
    """recv = every rank's send concatenated (block sizes `counts`): this rank's block, then the ring."""
    start = offsets[group.rank]
    recv[start : start + send.size] = send
    allgather_blocks(group.comm, recv, counts, offsets)

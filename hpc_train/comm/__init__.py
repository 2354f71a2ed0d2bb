"""Collectives: `mpi`, `ring`, `shm`, `hierarchical` and `auto` allreduce, plus
reduce-scatter, allgather, broadcast and asynchronous allreduce on a background engine."""

from __future__ import annotations

from .check import CollectiveMismatchError
from .collectives import ALGORITHMS, allgather, allreduce, broadcast, reduce_scatter
from .engine import Handle, engine
from .group import group_for
from .ring import partition
from .shm import SharedArray


def allreduce_async(x, op: str = "sum", algorithm: str = "auto", out=None, *, name: str = "") -> Handle:
    """Queue an allreduce on the background engine; `handle.wait()` returns the result.

    The cross-rank check is always on here: a mismatch raises CollectiveMismatchError
    from `wait()` on every rank. Do not modify x (or out) until the handle is done.
    """
    eng = engine()
    return eng.submit(
        lambda comm: allreduce(x, op, algorithm, out, comm=comm, check=True, name=name),
        name or "allreduce",
    )


def shared_empty(shape, dtype="float32", comm=None) -> SharedArray:
    """An uninitialized array in node-shared memory (collective over the node).

    Reducing it in place (`allreduce(a, out=a)`) with `shm`, `hierarchical` or `auto`
    skips the copy into the shared window. Only the communicator it was made for
    (default: the world) reduces it without copies.
    """
    from .shm import shared_empty as allocate

    return allocate(group_for(comm).topology.node, shape, dtype)


__all__ = [
    "ALGORITHMS", "CollectiveMismatchError", "Handle", "SharedArray", "allgather", "allreduce",
    "allreduce_async", "broadcast", "partition", "reduce_scatter", "shared_empty",
]

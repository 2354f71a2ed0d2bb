"""Collectives: `mpi`, `ring`, `shm`, `hierarchical` and `auto` allreduce, plus
reduce-scatter, allgather, broadcast and asynchronous allreduce on a background engine."""

from __future__ import annotations

from ..blocks import partition
from .algorithms import ALGORITHMS, ALLREDUCE, Algorithm
from .check import CollectiveMismatchError
from .collectives import (
    allgather,
    allgather_node,
    allreduce,
    broadcast,
    node_barrier,
    node_piece,
    node_shared_array,
    reduce_scatter,
    reduce_scatter_node,
)
from .engine import Handle, engine
from .group import group_for
from .shm import SharedArray, SharedMemoryTimeout


def _on_engine(collective, name: str, *args, **kwargs) -> Handle:
    """Queue collective(*args, comm=<engine's>, check=True, **kwargs) on the background engine."""
    x = args[0]
    detail = f"{collective.__name__} {getattr(x, 'shape', '')} {getattr(x, 'dtype', '')}"
    return engine().submit(lambda comm: collective(*args, comm=comm, check=True, name=name, **kwargs),
                           name or collective.__name__, detail)


def allreduce_async(x, op: str = "sum", algorithm: str = "auto", out=None, *, name: str = "") -> Handle:
    """Queue an allreduce on the background engine; `handle.wait()` returns the result.

    The cross-rank check is always on here: a mismatch raises CollectiveMismatchError
    from `wait()` on every rank. Do not modify x (or out) until the handle is done.
    """
    return _on_engine(allreduce, name, x, op, algorithm, out)


def reduce_scatter_async(x, op: str = "sum", out=None, *, counts=None, name: str = "") -> Handle:
    """Queue a reduce_scatter (blocks `counts`) on the background engine; see allreduce_async."""
    return _on_engine(reduce_scatter, name, x, op, "auto", out, counts=counts)


def reduce_scatter_node_async(x, op: str = "sum", *, name: str = "") -> Handle:
    """Queue a reduce_scatter_node (x from `shared_empty`) on the background engine; see allreduce_async."""
    return _on_engine(reduce_scatter_node, name, x, op)


def allgather_async(x, out=None, *, name: str = "") -> Handle:
    """Queue an allgather (first dimensions may differ) on the background engine; see allreduce_async."""
    return _on_engine(allgather, name, x, "auto", out)


def shared_empty(shape, dtype="float32", comm=None) -> SharedArray:
    """An uninitialized array in node-shared memory (collective over the node).

    Reducing it in place (`allreduce(a, out=a)`) with `shm`, `hierarchical` or `auto`
    skips the copy into the shared window. Only the communicator it was made for
    (default: the world) reduces it without copies.
    """
    from .shm import shared_empty as allocate

    return allocate(group_for(comm).topology.node, shape, dtype)


__all__ = [
    "ALGORITHMS", "ALLREDUCE", "Algorithm", "CollectiveMismatchError", "Handle", "SharedArray", "SharedMemoryTimeout",
    "allgather",
    "allgather_async", "allgather_node", "allreduce", "allreduce_async", "broadcast", "node_barrier", "node_piece",
    "node_shared_array", "partition", "reduce_scatter", "reduce_scatter_async", "reduce_scatter_node",
    "reduce_scatter_node_async", "shared_empty",
]

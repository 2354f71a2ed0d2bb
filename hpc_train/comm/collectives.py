"""Public collectives: argument handling, validation and dispatch to an algorithm.

Algorithms see flat, contiguous arrays of one dtype (send may be recv for in
place). Everything else is settled here: output allocation, non-contiguous and
read-only inputs, zero-length arrays, `mean`, device staging and the optional
cross-rank check.
"""

from __future__ import annotations

import numpy as np

from .. import backend, settings
from ..blocks import partition
from . import auto, hierarchical, mpi_algo
from .algorithms import ALLGATHER, ALLREDUCE, BLOCK_ALGORITHMS, REDUCE_SCATTER
from .check import describe, verify_same
from .group import Group, group_for
from .ops import ReduceOp, mpi_wire_dtype, reduce_op, scale_mean, validate
from .shm import FLAG_OPCODES, SharedArray, gather_pieces_shared, node_array, reduce_scatter_shared

# Shared-memory inputs skip the copy-in above this size; below it the C flag paths, which
# copy in anyway, are faster than the zero-copy path's MPI barriers (measured: 1-2 MiB).
ZERO_COPY_MIN_BYTES = 1 << 20


def resolve_algorithm(algorithm: str, nbytes: int, group: Group, on_device: bool) -> str:
    """Turn `auto` into a concrete algorithm; reject names and topologies that cannot work."""
    if algorithm != "auto" and algorithm not in ALLREDUCE:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {('auto', *ALLREDUCE)}")
    if algorithm == "auto":
        return "mpi" if on_device else auto.choose(nbytes, group.topology)
    if ALLREDUCE[algorithm].one_node and group.topology.num_nodes > 1:
        raise ValueError(
            f"algorithm {algorithm!r} needs every rank on one node; this communicator spans "
            f"{group.topology.num_nodes} nodes (use {ALLREDUCE[algorithm].across_nodes!r} or 'auto')"
        )
    return algorithm


def _output(out, shape, dtype, xp, what: str):
    """The array the result goes to: `out` after checking it, or a new one."""
    if out is None:
        return xp.empty(shape, dtype=dtype)
    result = backend.as_array(out)
    if result.shape != tuple(shape) or result.dtype != dtype:
        raise ValueError(
            f"{what}: out has shape {result.shape} dtype {result.dtype}, "
            f"expected shape {tuple(shape)} dtype {dtype}"
        )
    if not result.flags.writeable:
        raise ValueError(f"{what}: out is read-only")
    return result


def _flat_input(arr, xp):
    """A flat contiguous view of arr, copying only when arr is not contiguous."""
    return (arr if arr.flags.c_contiguous else xp.ascontiguousarray(arr)).reshape(-1)


def _checking(check) -> bool:
    return bool(check) or (check is None and settings.current().check)


def _check(group: Group, what: str, name: str, **fields) -> None:
    """Verify that every rank makes the same call, name included (see check.verify_same).

    Two fused buckets of equal shape submitted in different orders differ only by name.
    """
    verify_same(group.comm, f"{what} {name}".strip(), describe(name=name, **fields))


def _execute(run, send, result, xp, *, staged: bool, in_place: bool) -> None:
    """run(send_flat, recv_flat) into result, through pinned host buffers when `staged`.

    Non-contiguous results are computed in a contiguous temporary and copied back.
    """
    contiguous = result.flags.c_contiguous
    if in_place:
        recv = send
    else:
        recv = result.reshape(-1) if contiguous else xp.empty(result.size, result.dtype)
    if staged:
        host_send = backend.staging.to_host(send, "send")
        host_recv = host_send if in_place else (
            backend.staging.host_buffer("recv", recv.nbytes).view(recv.dtype))
        run(host_send, host_recv)
        backend.staging.to_device(host_recv, recv)
    else:
        backend.sync_device(send)
        run(send, recv)
    if not contiguous:
        result[...] = recv.reshape(result.shape)


class _NotDirect(Exception):
    """The arguments do not fit a cached direct plan; take the general path."""


# (shape, strides, dtype, op, algorithm) -> plan, for calls that end in one MPI_Allreduce on
# C-contiguous host arrays of the world. Python costs ~0.5 us a call against MPI's ~1 us
# for small messages, so these skip everything the general path would re-derive.
_direct_plans: dict = {}
# Shared arrays small enough to skip the zero-copy path are reduced like any other array.
_DIRECT_TYPES = (np.ndarray, SharedArray)
auto.on_change(_direct_plans.clear)


def _direct_mpi_plan(comm, mpi_op, divisor: int):
    from mpi4py import MPI

    in_place = MPI.IN_PLACE

    def run(x, out):
        if out is None:
            out = np.empty_like(x)
            comm.Allreduce(x, out, mpi_op)
        elif out is x:
            comm.Allreduce(in_place, x, mpi_op)
        elif type(out) is np.ndarray and out.shape == x.shape and out.flags.c_contiguous:
            comm.Allreduce(x, out, mpi_op)  # mpi4py rejects other dtypes and read-only buffers
        else:
            raise _NotDirect
        if divisor:
            np.divide(out, divisor, out=out, casting="unsafe")
        return out

    return run


def _direct_flag_plan(flags, opcode: int):
    def run(x, out):
        if out is None:
            out = np.empty_like(x)
        elif out is not x and (type(out) is not np.ndarray or out.shape != x.shape):
            raise _NotDirect
        flags.allreduce(x, out, opcode)  # checks everything before it communicates
        return out

    return run


def _direct_plan(group: Group, chosen: str, spec: ReduceOp, arr):
    """A plan for C-contiguous host arrays whose call is one MPI_Allreduce or one flag call."""
    if chosen == "mpi" and mpi_wire_dtype(arr.dtype) == arr.dtype:
        return _direct_mpi_plan(group.comm, spec.mpi(), group.size if spec.scale_by_size else 0)
    if ALLREDUCE[chosen].node_window and group.topology.num_nodes == 1:
        flags = group.node_window().flags
        if flags is not None and flags.accepts(arr):
            return _direct_flag_plan(flags, FLAG_OPCODES[spec.name])
    return None


def allreduce(x, op: str = "sum", algorithm: str = "auto", out=None, *, comm=None,
              check: bool | None = None, name: str = ""):
    """Reduce x element-wise over all ranks; every rank gets the result.

    Returns `out` when given (`out=x` reduces in place), else a new array. The
    input is never modified unless it is `out`. `check=True` (default with
    HPC_TRAIN_CHECK=1) first verifies that all ranks pass the same shape, dtype,
    op and algorithm, raising CollectiveMismatchError on every rank otherwise.
    """
    if comm is None and check is None and type(x) in _DIRECT_TYPES:
        plan = _direct_plans.get((x.shape, x.strides, x.dtype, op, algorithm))
        if plan is not None:
            try:
                return plan(x, out)
            except (_NotDirect, BufferError, ValueError):
                pass  # raised before any communication: the general path explains or copes
    return _allreduce(x, op, algorithm, out, comm, check, name)


def _allreduce(x, op, algorithm, out, comm, check, name):
    group = group_for(comm)
    arr = backend.as_array(x)
    spec = reduce_op(op)
    validate(arr.dtype, spec)
    xp = backend.xp_of(arr)
    in_place = out is not None and (out is x or backend.as_array(out) is arr)
    result = arr if in_place else _output(out, arr.shape, arr.dtype, xp, f"allreduce {name}")
    shared_offset = None
    if in_place and isinstance(arr, SharedArray):
        shared_offset = arr.shared_offset(group.topology.node)
    on_device = xp is not np
    chosen = resolve_algorithm(algorithm, arr.nbytes, group, on_device)
    staged = _staged(xp) or (on_device and not ALLREDUCE[chosen].device)
    if staged:
        chosen = resolve_algorithm(algorithm, arr.nbytes, group, on_device=False)
    if _checking(check):  # the algorithm each rank will run, not only the one asked for
        _check(group, "allreduce", name, shape=arr.shape, dtype=arr.dtype.str, op=spec.name,
               algorithm=algorithm, chosen=chosen, shared=shared_offset)
    if arr.size == 0:
        return result
    if group.size == 1:
        if not in_place:
            result[...] = arr
        return result
    if (comm is None and not _checking(check) and type(x) in _DIRECT_TYPES
            and arr.flags.c_contiguous and (shared_offset is None or arr.nbytes <= ZERO_COPY_MIN_BYTES)):
        plan = _direct_plan(group, chosen, spec, arr)
        if plan is not None:
            _direct_plans[(x.shape, x.strides, x.dtype, op, algorithm)] = plan
    if shared_offset is not None and ALLREDUCE[chosen].node_window and arr.nbytes > ZERO_COPY_MIN_BYTES:
        hierarchical.allreduce_in_shared(group, arr, shared_offset, spec)
    else:
        algorithm_fn = ALLREDUCE[chosen].run
        _execute(lambda s, r: algorithm_fn(group, s, r, spec, backend.xp_of(s)),
                 _flat_input(arr, xp), result, xp, staged=staged, in_place=in_place)
    if spec.scale_by_size:
        scale_mean(result, group.size, xp)
    return result


def reduce_scatter(x, op: str = "sum", algorithm: str = "auto", out=None, *, counts=None, comm=None,
                   check: bool | None = None, name: str = ""):
    """This rank's block of the element-wise reduction of flattened x.

    Blocks follow `counts` (one per rank, summing to x.size; zeros allowed), by
    default `partition(x.size, size)`: sizes differ by at most one element, the
    first blocks taking the remainder.
    """
    group = group_for(comm)
    arr = backend.as_array(x)
    spec = reduce_op(op)
    validate(arr.dtype, spec)
    xp = backend.xp_of(arr)
    if counts is None:
        counts, _ = partition(arr.size, group.size)
    else:
        counts = [int(c) for c in counts]
        if len(counts) != group.size or sum(counts) != arr.size or min(counts) < 0:
            raise ValueError(f"reduce_scatter {name}: counts {counts} do not split {arr.size} elements "
                             f"over {group.size} ranks")
    mine = counts[group.rank]
    result = _output(out, (mine,), arr.dtype, xp, f"reduce_scatter {name}")
    if _checking(check):
        _check(group, "reduce_scatter", name, shape=arr.shape, dtype=arr.dtype.str, op=spec.name,
               algorithm=algorithm, counts=counts)
    if arr.size == 0:
        return result
    reduce_blocks = REDUCE_SCATTER[_block_algorithm(algorithm)]
    _execute(lambda send, recv: reduce_blocks(group, send, recv, counts, spec, backend.xp_of(send)),
             _flat_input(arr, xp), result, xp, staged=_staged(xp), in_place=False)
    if spec.scale_by_size:
        scale_mean(result, group.size, xp)
    return result


def node_piece(n: int, *, comm=None) -> tuple[int, int]:
    """[start, stop) of n elements that this rank owns among the ranks of its node."""
    node = group_for(comm).topology.node
    counts, offsets = partition(n, node.Get_size())
    r = node.Get_rank()
    return offsets[r], offsets[r] + counts[r]


def reduce_scatter_node(x, op: str = "sum", *, comm=None, check: bool | None = None, name: str = ""):
    """Reduce x over all ranks into this rank's node piece of x (`node_piece(x.size)`), in place.

    x must be a node-shared array from `shared_empty(comm=comm)` (or a contiguous
    slice of one): peers read their pieces straight from it. Across nodes, the ranks
    with the same local rank then allreduce their piece (with nodes of different
    sizes, x is allreduced whole). Returns the piece; the other elements of x are
    left as they were or hold the result, and x must not be written again before every rank
    of the node has passed a later `node_barrier` (peers may still be reading it).
    """
    group = group_for(comm)
    arr = backend.as_array(x)
    spec = reduce_op(op)
    validate(arr.dtype, spec)
    node = group.topology.node
    offset = arr.shared_offset(node) if isinstance(arr, SharedArray) else None
    if offset is None:
        raise ValueError(f"reduce_scatter_node {name}: x must lie in node-shared memory allocated with "
                         f"shared_empty for this communicator (got {type(x).__name__} {arr.shape})")
    if _checking(check):
        _check(group, "reduce_scatter_node", name, shape=arr.shape, dtype=arr.dtype.str, op=spec.name)
    if group.size == 1:
        return arr.reshape(-1)
    if group.topology.num_nodes > 1 and not group.topology.uniform:
        # pieces differ between nodes of different sizes and cannot be paired: reduce everything
        _allreduce(arr, op, "auto", arr, comm, False, name)
        a, b = node_piece(arr.size, comm=comm)
        return arr.reshape(-1)[a:b]
    piece = reduce_scatter_shared(arr._shared, offset, arr.reshape(-1), spec,
                                  inter_node=hierarchical.inter_node_hook(group, spec))
    if spec.scale_by_size:
        scale_mean(piece, group.size)
    return piece


def allgather_node(arrays, *, comm=None) -> None:
    """After `reduce_scatter_node` of each x in `arrays` (and its wait): every rank of the node
    copies the other ranks' pieces, so that each holds the whole result (collective over the node).

    Across nodes nothing moves: reduce_scatter_node already made each piece the reduction over
    every node. Only shared memory is read: no message, one barrier before and one after.
    """
    node = group_for(comm).topology.node
    if node.Get_size() > 1:
        gather_pieces_shared([backend.as_array(x) for x in arrays], node)


def node_shared_array(count: int, dtype="float32", *, comm=None):
    """One array per node in shared memory, mapped by every rank of the node (collective)."""
    return node_array(group_for(comm).topology.node, count, dtype)


def node_barrier(*, comm=None) -> None:
    """Wait for every rank of this rank's node."""
    group_for(comm).topology.node.Barrier()


def allgather(x, algorithm: str = "auto", out=None, *, comm=None, check: bool | None = None,
              name: str = ""):
    """Concatenate every rank's x along axis 0 (first dimensions may differ)."""
    group = group_for(comm)
    arr = backend.as_array(x)
    arr = arr.reshape(1) if arr.ndim == 0 else arr
    xp = backend.xp_of(arr)
    if _checking(check):
        _check(group, "allgather", name, trailing_shape=arr.shape[1:], dtype=arr.dtype.str,
               algorithm=algorithm)
    gather_blocks = ALLGATHER[_block_algorithm(algorithm)]
    firsts = np.empty(group.size, np.int64)
    group.comm.Allgather(np.array([arr.shape[0]], np.int64), firsts)
    row = int(np.prod(arr.shape[1:], dtype=np.int64))
    counts = [int(f) * row for f in firsts]
    offsets = [sum(counts[:q]) for q in range(group.size)]
    result = _output(out, (int(firsts.sum()), *arr.shape[1:]), arr.dtype, xp, f"allgather {name}")
    if result.size == 0:
        return result

    _execute(lambda send, recv: gather_blocks(group, send, recv, counts, offsets), _flat_input(arr, xp), result,
             xp, staged=_staged(xp), in_place=False)
    return result


def broadcast(x, root: int = 0, *, comm=None, check: bool | None = None, name: str = ""):
    """Copy root's x into x on every rank (in place); returns x."""
    group = group_for(comm)
    if not 0 <= root < group.size:
        raise ValueError(f"broadcast {name}: root {root} is not a rank of a {group.size}-rank communicator")
    arr = backend.as_array(x)
    xp = backend.xp_of(arr)
    if _checking(check):
        _check(group, "broadcast", name, shape=arr.shape, dtype=arr.dtype.str, root=root)
    if arr.size:
        _execute(lambda _send, buf: mpi_algo.broadcast(group, buf, root), _flat_input(arr, xp),
                 arr, xp, staged=_staged(xp), in_place=True)
    return x


def _staged(xp) -> bool:
    """Device memory goes through host buffers unless MPI is CUDA-aware."""
    return xp is not np and not backend.cuda_awareness().aware


def _block_algorithm(algorithm: str) -> str:
    """reduce_scatter and allgather offer the BLOCK_ALGORITHMS; `auto` is the MPI library's."""
    if algorithm not in BLOCK_ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r}: reduce_scatter and allgather offer {BLOCK_ALGORITHMS}")
    return "mpi" if algorithm == "auto" else algorithm

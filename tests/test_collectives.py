"""Every algorithm x op x dtype x size class x placement against numpy's own reduction.

Run under mpirun (tests/run_mpi.sh) at 2 and 4 ranks, and at 4 ranks with
pretended nodes of 2 so that `hierarchical` crosses a node boundary.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import hpc_train as ht
from hpc_train.comm import node_piece, partition, reduce_scatter_node
from hpc_train.comm.collectives import ZERO_COPY_MIN_BYTES
from hpc_train.comm.ops import bfloat16_dtype
from hpc_train.comm.shm import pipeline_chunk_bytes

pytestmark = pytest.mark.mpi(min_size=2)

ALGORITHMS = ["mpi", "ring", "shm", "hierarchical", "auto"]
OPS = ["sum", "mean", "max", "min", "prod"]
DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
          np.float16, np.float32, np.float64, np.complex64, np.complex128]
if bfloat16_dtype() is not None:
    DTYPES.append(bfloat16_dtype())


def sizes(p: int, itemsize: int) -> list[int]:
    """0, 1, p-1, p+1 and a large odd count spanning several shm chunks and ring segments."""
    large = 3 * pipeline_chunk_bytes() // itemsize + 7
    return [0, 1, p - 1, p + 1, large | 1]


def pattern(n: int, dtype, rank: int, op: str) -> np.ndarray:
    """Small integers (exact in every dtype, also after summing or multiplying over 4 ranks)."""
    rng = np.random.default_rng(1000 * rank + n)
    low = 1 if (op == "prod" or np.dtype(dtype).kind == "u") else -3
    high = 3 if op == "prod" else 4
    return rng.integers(low, high, size=n).astype(dtype)


def expected(inputs: list[np.ndarray], op: str, dtype) -> np.ndarray:
    stack = np.stack([a.astype(np.complex128 if np.dtype(dtype).kind == "c" else np.float64) for a in inputs])
    if op in ("sum", "mean"):
        total = stack.sum(axis=0)
        if op == "mean":
            total = np.trunc(total / len(inputs)) if np.dtype(dtype).kind in "iu" else total / len(inputs)
        return total
    if op == "prod":
        return stack.prod(axis=0)
    if np.dtype(dtype).kind == "c":
        raise AssertionError("max/min on complex are rejected before reaching here")
    return stack.max(axis=0) if op == "max" else stack.min(axis=0)


def skip_if_unsupported(algorithm: str):
    if algorithm == "shm" and ht.num_nodes() > 1:
        pytest.skip("shm needs every rank on one node (pretended nodes are in use)")


def assert_reduced(result, want, dtype, what):
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        np.testing.assert_array_equal(result.astype(np.float64), want, err_msg=what)
    else:
        component = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
        tol = {2: 1e-2, 4: 1e-6, 8: 1e-12}[component]
        np.testing.assert_allclose(result.astype(want.dtype), want, rtol=tol, atol=tol, err_msg=what)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_allreduce_matrix(comm, algorithm, op):
    skip_if_unsupported(algorithm)
    p, r = comm.Get_size(), comm.Get_rank()
    for dtype in DTYPES:
        if np.dtype(dtype).kind == "c" and op in ("max", "min"):
            with pytest.raises(TypeError, match="complex"):
                ht.allreduce(np.zeros(3, dtype), op=op, algorithm=algorithm)
            continue
        for n in sizes(p, np.dtype(dtype).itemsize):
            x = pattern(n, dtype, r, op)
            want = expected(comm.allgather(x), op, dtype)
            what = f"{algorithm} {op} {np.dtype(dtype)} n={n}"
            original = x.copy()
            out_of_place = ht.allreduce(x, op=op, algorithm=algorithm)
            np.testing.assert_array_equal(x, original, err_msg=f"{what}: input modified")
            assert out_of_place.shape == x.shape and out_of_place.dtype == x.dtype
            assert_reduced(out_of_place, want, dtype, what + " out-of-place")
            in_place = x.copy()
            assert ht.allreduce(in_place, op=op, algorithm=algorithm, out=in_place) is in_place
            assert_reduced(in_place, want, dtype, what + " in-place")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_allreduce_layouts(comm, algorithm):
    """Non-contiguous inputs and outputs, read-only inputs, 2-D shapes, an explicit out."""
    skip_if_unsupported(algorithm)
    p, r = comm.Get_size(), comm.Get_rank()
    base = np.arange(2 * 40001, dtype=np.float64).reshape(2, 40001) + r
    want = sum(np.arange(2 * 40001, dtype=np.float64).reshape(2, 40001) + q for q in range(p))
    strided = base[:, ::3]
    np.testing.assert_array_equal(ht.allreduce(strided, algorithm=algorithm), want[:, ::3])
    transposed = base.T
    np.testing.assert_array_equal(ht.allreduce(transposed, algorithm=algorithm), want.T)
    readonly = base.copy()
    readonly.flags.writeable = False
    np.testing.assert_array_equal(ht.allreduce(readonly, algorithm=algorithm), want)
    out = np.empty((2, 40001 * 2))[:, ::2]
    assert ht.allreduce(base, algorithm=algorithm, out=out) is out
    np.testing.assert_array_equal(out, want)
    inplace_strided = base.copy()[:, ::2]
    ht.allreduce(inplace_strided, algorithm=algorithm, out=inplace_strided)
    np.testing.assert_array_equal(inplace_strided, want[:, ::2])
    with pytest.raises(ValueError, match="shape"):
        ht.allreduce(base, algorithm=algorithm, out=np.empty(3))


def test_random_floats_match_numpy(comm):
    """Non-integer data: every algorithm agrees with numpy's sum within float tolerance."""
    r = comm.Get_rank()
    x = np.random.default_rng(r).standard_normal(123457).astype(np.float32)
    want = np.sum(np.stack(comm.allgather(x)).astype(np.float64), axis=0)
    for algorithm in ALGORITHMS:
        if algorithm == "shm" and ht.num_nodes() > 1:
            continue
        np.testing.assert_allclose(ht.allreduce(x, algorithm=algorithm), want, rtol=1e-5, atol=1e-5)


def test_results_identical_on_every_rank(comm):
    """Floating-point results are bitwise equal across ranks (the owner's value is copied)."""
    x = np.random.default_rng(comm.Get_rank()).standard_normal(200003).astype(np.float32)
    for algorithm in ALGORITHMS:
        if algorithm == "shm" and ht.num_nodes() > 1:
            continue
        y = ht.allreduce(x, algorithm=algorithm)
        digests = comm.allgather(y.tobytes())
        assert all(d == digests[0] for d in digests), algorithm


@pytest.mark.parametrize("algorithm", ["shm", "hierarchical", "auto"])
def test_shared_input_reduced_in_place(comm, algorithm):
    skip_if_unsupported(algorithm)
    p, r = comm.Get_size(), comm.Get_rank()
    chunk = pipeline_chunk_bytes()
    for n in [1, p + 1, 3 * chunk // 4 + 5, ZERO_COPY_MIN_BYTES // 4 + 3 * chunk // 4 + 1]:
        buf = ht.shared_empty(n, np.float32)
        buf[:] = np.arange(n) % 5 + r
        view = buf[: max(1, n - 1)]  # a view of a shared array reduces without copy-in too
        ht.allreduce(view, algorithm=algorithm, out=view)
        want = (np.arange(n) % 5) * p + p * (p - 1) / 2
        np.testing.assert_array_equal(view, want[: view.size])
        comm.Barrier()
        ht.allreduce(buf, op="max", algorithm=algorithm, out=buf)


def test_reduce_scatter_node_reduces_this_ranks_piece_in_place(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    q = comm.allreduce(ht.local_size(), op=MPI.MAX)  # the same sizes on every rank, whatever its node
    for n in [1, q - 1, q + 1, 3 * pipeline_chunk_bytes() // 4 + 5]:
        buf = ht.shared_empty(n + 2, np.float32)
        buf[:] = np.arange(n + 2) % 7 + r
        x = buf[1 : n + 1]  # a slice of a shared array, like a bucket of the fusion buffer
        piece = reduce_scatter_node(x, op="mean")
        a, b = node_piece(n)
        assert piece.size == b - a and (piece.size == 0 or np.shares_memory(piece, buf))
        want = (np.arange(n + 2) % 7 + (p - 1) / 2)[1 : n + 1]
        np.testing.assert_allclose(piece, want[a:b], rtol=1e-6)
        if ht.runtime.topology().uniform:  # (nodes of different sizes reduce everything)
            np.testing.assert_array_equal(x[:a], (np.arange(n + 2) % 7 + r)[1 : a + 1])  # others untouched
        comm.Barrier()  # peers read this rank's other pieces until every rank is done
    with pytest.raises(ValueError, match="node-shared memory"):
        reduce_scatter_node(np.ones(4, np.float32))


@pytest.mark.parametrize("algorithm", ["auto", "mpi", "ring"])
def test_reduce_scatter(comm, algorithm):
    p, r = comm.Get_size(), comm.Get_rank()
    for n in [0, 1, p - 1, p + 1, 300001]:
        x = (np.arange(n, dtype=np.float64) * (r + 1)).reshape(-1)
        block = ht.reduce_scatter(x, algorithm=algorithm)
        counts, offsets = partition(n, p)
        full = np.arange(n, dtype=np.float64) * sum(q + 1 for q in range(p))
        np.testing.assert_array_equal(block, full[offsets[r] : offsets[r] + counts[r]])
        halves = (np.arange(n) % 100).astype(np.float16) * (r + 1)
        mean = ht.reduce_scatter(halves, op="mean", algorithm=algorithm)
        want = (np.arange(n) % 100) * sum(q + 1 for q in range(p)) / p
        assert mean.dtype == np.float16
        np.testing.assert_allclose(mean, want[offsets[r] : offsets[r] + counts[r]], rtol=1e-3)


@pytest.mark.parametrize("algorithm", ["auto", "mpi", "ring"])
def test_allgather_uneven(comm, algorithm):
    p, r = comm.Get_size(), comm.Get_rank()
    x = np.full((r + 1, 3), r, dtype=np.int32)  # first dimensions differ per rank
    gathered = ht.allgather(x, algorithm=algorithm)
    want = np.concatenate([np.full((q + 1, 3), q, np.int32) for q in range(p)])
    np.testing.assert_array_equal(gathered, want)
    big = np.arange(100003, dtype=np.float32) + r
    np.testing.assert_array_equal(ht.allgather(big, algorithm=algorithm),
                                  np.concatenate([np.arange(100003, dtype=np.float32) + q for q in range(p)]))
    empty = ht.allgather(np.zeros((0, 3), np.int32), algorithm=algorithm)
    assert empty.shape == (0, 3)


def test_broadcast(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    for root in range(p):
        x = np.full((4, 5), r, dtype=np.complex64)
        assert ht.broadcast(x, root=root) is x
        np.testing.assert_array_equal(x, np.full((4, 5), root, np.complex64))
    strided = np.full(20, r, np.float32)[::2]
    ht.broadcast(strided, root=p - 1)
    np.testing.assert_array_equal(strided, np.full(10, p - 1, np.float32))
    with pytest.raises(ValueError, match="root"):
        ht.broadcast(np.zeros(2), root=p)

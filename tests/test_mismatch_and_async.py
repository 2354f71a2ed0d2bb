"""Cross-rank validation and the background engine, under mpirun."""

from __future__ import annotations

import numpy as np
import pytest

import hpc_train as ht
from hpc_train import CollectiveMismatchError

pytestmark = pytest.mark.mpi(min_size=2)


def test_shape_mismatch_raises_on_every_rank(comm):
    r = comm.Get_rank()
    x = np.zeros(4 if r == 0 else 5, np.float32)
    with pytest.raises(CollectiveMismatchError) as info:
        ht.allreduce(x, check=True, name="grad.fc1")
    message = str(info.value)
    assert "grad.fc1" in message
    assert "rank 0: name=grad.fc1 shape=(4,)" in message
    assert "shape=(5,)" in message
    comm.Barrier()  # every rank got here: nobody hung


def test_dtype_and_op_mismatch(comm):
    r = comm.Get_rank()
    with pytest.raises(CollectiveMismatchError, match="dtype"):
        ht.allreduce(np.zeros(3, np.float32 if r else np.float64), check=True)
    with pytest.raises(CollectiveMismatchError, match="op=max"):
        ht.allreduce(np.zeros(3), op="max" if r == 0 else "sum", check=True)
    with pytest.raises(CollectiveMismatchError, match="root"):
        ht.broadcast(np.zeros(3), root=r % 2, check=True)
    with pytest.raises(CollectiveMismatchError):
        ht.reduce_scatter(np.zeros(3 + r), check=True)
    with pytest.raises(CollectiveMismatchError, match="trailing_shape"):
        ht.allgather(np.zeros((2, 1 + r)), check=True)
    # after all that, a matching call still works
    np.testing.assert_array_equal(ht.allreduce(np.ones(3), check=True), np.full(3, comm.Get_size()))


def test_async_mismatch_raises_from_wait(comm):
    r = comm.Get_rank()
    handle = ht.allreduce_async(np.zeros(2 + r), name="bucket0")
    with pytest.raises(CollectiveMismatchError, match="bucket0"):
        handle.wait(timeout=60)
    assert handle.done()


def test_many_async_handles_in_flight(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    inputs = [np.full(n, r + k, np.float32) for k, n in enumerate([1, 1000, 300001, 7, 250000])]
    handles = [ht.allreduce_async(x, algorithm=a, op="mean")
               for x, a in zip(inputs, ["auto", "ring", "shm" if ht.num_nodes() == 1 else "mpi", "mpi",
                                        "hierarchical"], strict=True)]
    # Wait in reverse order: completion order is the engine's, not the caller's.
    for k, handle in reversed(list(enumerate(handles))):
        result = handle.wait(timeout=120)
        np.testing.assert_allclose(result, np.full(inputs[k].size, k + (p - 1) / 2), rtol=1e-6)
        assert handle.done()


def test_async_overlaps_main_thread_collectives(comm):
    """The engine's traffic runs on its own communicator: direct calls meanwhile do not mix."""
    p = comm.Get_size()
    handle = ht.allreduce_async(np.ones(500000, np.float64), algorithm="ring")
    direct = ht.allreduce(np.full(1000, 2.0), algorithm="ring")
    np.testing.assert_array_equal(direct, np.full(1000, 2.0 * p))
    np.testing.assert_array_equal(handle.wait(timeout=120), np.full(500000, float(p)))


def test_bad_arguments_are_named(comm):
    with pytest.raises(ValueError, match="unknown reduction op 'avg'"):
        ht.allreduce(np.zeros(2), op="avg")
    with pytest.raises(ValueError, match="unknown algorithm 'nccl'"):
        ht.allreduce(np.zeros(2), algorithm="nccl")
    with pytest.raises(TypeError, match="only numeric"):
        ht.allreduce(np.array(["a", "b"]))


def test_same_shapes_different_names_are_a_mismatch(comm):
    """Buckets submitted in a different order on different ranks must not pair up silently."""
    r = comm.Get_rank()
    with pytest.raises(CollectiveMismatchError, match="name=bucket1"):
        ht.allreduce_async(np.zeros(4), name="bucket0" if r == 0 else "bucket1").wait(timeout=60)

"""DistributedOptimizer under mpirun: equal on every rank, equal to one rank on the global batch."""

from __future__ import annotations

import numpy as np
import pytest

import hpc_train as ht
from hpc_train import nn, optim

pytestmark = pytest.mark.mpi(min_size=2)

WIDTHS = (24, 40, 16, 5)
PER_RANK = 6


def global_batches(steps: int, size: int, micro: int = 1):
    """The same global batches on every rank: (steps, micro * size * PER_RANK) samples."""
    rng = np.random.default_rng(42)
    n = micro * size * PER_RANK
    return [(rng.standard_normal((n, WIDTHS[0])).astype(np.float32), rng.integers(0, WIDTHS[-1], n))
            for _ in range(steps)]


def train_single(batches, make_opt, steps):
    """Reference: one process, whole global batch, no MPI."""
    model = nn.mlp(WIDTHS, seed=7)
    opt = make_opt(model)
    loss = nn.SoftmaxCrossEntropy()
    for x, y in batches[:steps]:
        opt.zero_grad()
        loss.forward(model(x), y)
        model.backward(loss.backward())
        opt.step()
    return model


def train_distributed(comm, batches, make_opt, steps, micro=1, seed=7, **kwargs):
    p, r = comm.Get_size(), comm.Get_rank()
    model = nn.mlp(WIDTHS, seed=seed)
    dist = optim.DistributedOptimizer(make_opt(model), model, **kwargs)
    loss = nn.SoftmaxCrossEntropy()
    for x, y in batches[:steps]:
        dist.zero_grad()
        for m in range(micro):  # micro-batch m of this rank's share
            lo = (m * p + r) * PER_RANK
            loss.forward(model(x[lo : lo + PER_RANK]), y[lo : lo + PER_RANK])
            model.backward(loss.backward())
        dist.step()
    return model


def assert_identical_across_ranks(comm, model):
    for name, p in model.named_parameters().items():
        digests = comm.allgather(p.data.tobytes())
        assert all(d == digests[0] for d in digests), f"{name} differs across ranks"


def assert_close(model, reference, rtol):
    for (name, p), q in zip(model.named_parameters().items(), reference.parameters(), strict=True):
        np.testing.assert_allclose(p.data, q.data, rtol=rtol, atol=rtol, err_msg=name)


def sgd(model):
    return optim.SGD(model, lr=0.1, momentum=0.9, weight_decay=1e-4)


def adam(model):
    return optim.Adam(model, lr=1e-3)


@pytest.mark.parametrize("make_opt", [sgd, adam], ids=["sgd", "adam"])
@pytest.mark.parametrize("bucket_mb", [25.0, 0.002], ids=["one-bucket", "many-buckets"])
def test_matches_single_rank_on_global_batch(comm, make_opt, bucket_mb):
    batches = global_batches(6, comm.Get_size())
    model = train_distributed(comm, batches, make_opt, 6, bucket_mb=bucket_mb)
    assert_identical_across_ranks(comm, model)
    assert_close(model, train_single(batches, make_opt, 6), rtol=2e-5)


def test_start_broadcasts_rank_zero(comm):
    model = nn.mlp(WIDTHS, seed=100 + comm.Get_rank())  # deliberately different on every rank
    opt = optim.SGD(model, lr=0.1)
    optim.DistributedOptimizer(opt, model)
    assert_identical_across_ranks(comm, model)
    np.testing.assert_array_equal(model.parameters()[0].data, nn.mlp(WIDTHS, seed=100).parameters()[0].data)


def test_gradient_accumulation(comm):
    batches = global_batches(4, comm.Get_size(), micro=2)
    model = train_distributed(comm, batches, sgd, 4, micro=2, backward_passes_per_step=2, bucket_mb=0.002)
    assert_identical_across_ranks(comm, model)
    assert_close(model, train_single(batches, sgd, 4), rtol=2e-5)


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_compression(comm, compression):
    batches = global_batches(4, comm.Get_size())
    model = train_distributed(comm, batches, sgd, 4, compression=compression, bucket_mb=0.002)
    assert_identical_across_ranks(comm, model)
    assert_close(model, train_single(batches, sgd, 4), rtol=2e-2 if compression == "bf16" else 2e-3)


def test_bad_arguments(comm):
    model = nn.mlp(WIDTHS)
    with pytest.raises(ValueError, match="compression 'int8'"):
        optim.DistributedOptimizer(optim.SGD(model, lr=0.1), model, compression="int8")
    with pytest.raises(ValueError, match="backward_passes_per_step"):
        optim.DistributedOptimizer(optim.SGD(model, lr=0.1), model, backward_passes_per_step=0)


def test_public_api_exports(comm):
    assert ht.DistributedOptimizer is optim.DistributedOptimizer
    assert ht.broadcast_parameters is optim.broadcast_parameters


def test_sync_batchnorm_equals_batchnorm_on_the_global_batch(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4 * p, 3, 3, 5)) * 2 + 1  # the global batch, the same on every rank
    dy = rng.standard_normal(x.shape)
    whole = nn.BatchNorm(5, dtype=np.float64)
    synced = nn.BatchNorm(5, sync=True, dtype=np.float64)
    mine = slice(4 * r, 4 * r + 4)
    np.testing.assert_allclose(synced(x[mine]), whole(x)[mine], rtol=1e-10, atol=1e-12)
    dx_whole = whole.backward(dy)
    # the global loss sums every rank's part: each rank's parameter gradient is its share
    dx_synced = synced.backward(dy[mine])
    np.testing.assert_allclose(dx_synced, dx_whole[mine], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ht.allreduce(synced.weight.grad), whole.weight.grad, rtol=1e-10)
    np.testing.assert_allclose(synced.running_var, whole.running_var, rtol=1e-10)


def test_streamed_row_blocks_and_split_buckets(comm, monkeypatch):
    """Gradients announced in row blocks, buckets cut inside parameters: same result."""
    monkeypatch.setattr(nn.Linear, "STREAM_BYTES", 256)  # every weight streams, a row or two a block
    batches = global_batches(4, comm.Get_size())
    model = train_distributed(comm, batches, sgd, 4, bucket_mb=0.001)
    assert_identical_across_ranks(comm, model)
    assert_close(model, train_single(batches, sgd, 4), rtol=2e-5)


@pytest.mark.parametrize("make_opt", [sgd, adam], ids=["sgd", "adam"])
def test_zero1_matches_data_parallel_with_a_shard_of_the_state(comm, make_opt):
    p = comm.Get_size()
    batches = global_batches(5, p)
    reference = train_distributed(comm, batches, make_opt, 5, bucket_mb=0.002)

    model = nn.mlp(WIDTHS, seed=7)
    sharded = optim.ShardedOptimizer(make_opt(model), model, stage=1, bucket_mb=0.002)
    loss = nn.SoftmaxCrossEntropy()
    r = comm.Get_rank()
    for x, y in batches:
        sharded.zero_grad()
        loss.forward(model(x[r * PER_RANK : (r + 1) * PER_RANK]), y[r * PER_RANK : (r + 1) * PER_RANK])
        model.backward(loss.backward())
        sharded.step()
    assert_identical_across_ranks(comm, model)
    assert_close(model, reference, rtol=1e-6)
    total = model.num_parameters()
    kinds = 2 if make_opt is adam else 1
    held = comm.allgather(sharded.state_bytes())
    assert sum(held) == kinds * 4 * total  # every element's state exactly once, over all ranks
    assert max(held) <= kinds * 4 * (total // p + 1)  # ~1/p each (sizes not divisible by p)
    with pytest.raises(ValueError, match="stage 3 is not implemented"):
        optim.ShardedOptimizer(make_opt(model), model, stage=3)

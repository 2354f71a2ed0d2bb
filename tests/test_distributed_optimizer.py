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


def train_distributed(comm, batches, make_opt, steps, micro=1, seed=7, stage=0, node_shared=False, **kwargs):
    """Train on this rank's share; stage > 0 wraps with ShardedOptimizer, node_shared with
    NodeSharedOptimizer. Returns the model (with whole parameters, gathered, under stage 3) and the wrapper."""
    p, r = comm.Get_size(), comm.Get_rank()
    model = nn.mlp(WIDTHS, seed=seed)
    if stage:
        dist = optim.ShardedOptimizer(make_opt(model), model, stage=stage, **kwargs)
    elif node_shared:
        dist = optim.NodeSharedOptimizer(make_opt(model), model, **kwargs)
    else:
        dist = optim.DistributedOptimizer(make_opt(model), model, **kwargs)
    loss = nn.SoftmaxCrossEntropy()
    for x, y in batches[:steps]:
        dist.zero_grad()
        for m in range(micro):  # micro-batch m of this rank's share
            lo = (m * p + r) * PER_RANK
            loss.forward(model(x[lo : lo + PER_RANK]), y[lo : lo + PER_RANK])
            model.backward(loss.backward())
        dist.step()
    if stage == 3:
        for name, whole in dist.full_parameters().items():
            model.named_parameters()[name].data = whole
    return model, dist


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
    model, _ = train_distributed(comm, batches, make_opt, 6, bucket_mb=bucket_mb)
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
    model, _ = train_distributed(comm, batches, sgd, 4, micro=2, backward_passes_per_step=2, bucket_mb=0.002)
    assert_identical_across_ranks(comm, model)
    assert_close(model, train_single(batches, sgd, 4), rtol=2e-5)


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_compression(comm, compression):
    batches = global_batches(4, comm.Get_size())
    model, _ = train_distributed(comm, batches, sgd, 4, compression=compression, bucket_mb=0.002)
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
    model, _ = train_distributed(comm, batches, sgd, 4, bucket_mb=0.001)
    assert_identical_across_ranks(comm, model)
    assert_close(model, train_single(batches, sgd, 4), rtol=2e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("make_opt", [sgd, adam], ids=["sgd", "adam"])
def test_zero_matches_data_parallel_with_a_shard_of_the_state(comm, make_opt, stage):
    p = comm.Get_size()
    batches = global_batches(5, p)
    reference, _ = train_distributed(comm, batches, make_opt, 5, bucket_mb=0.002)
    model, sharded = train_distributed(comm, batches, make_opt, 5, stage=stage, bucket_mb=0.002)
    assert_identical_across_ranks(comm, model)
    assert_close(model, reference, rtol=1e-6)
    total = model.num_parameters()
    assert total % p  # the shards are uneven
    kinds = 2 if make_opt is adam else 1
    held = comm.allgather(sharded.state_bytes())
    assert sum(held) == kinds * 4 * total  # every element's state exactly once, over all ranks
    assert max(held) <= kinds * 4 * (total // p + 1)  # ~1/p each (sizes not divisible by p)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_holds_a_shard_and_a_few_transient_buffers(comm, stage):
    """Gradients: the shard plus buckets in flight; stage 3 parameters: the shard plus gathered layers."""
    r = comm.Get_rank()
    widths = (64,) * 7 + (5,)
    model = nn.mlp(widths, seed=1)
    sharded = optim.ShardedOptimizer(sgd(model), model, stage=stage, bucket_mb=0.01, buckets_in_flight=1)
    loss = nn.SoftmaxCrossEntropy()
    x = np.random.default_rng(r).standard_normal((8, 64)).astype(np.float32)
    for _ in range(2):
        sharded.zero_grad()
        loss.forward(model(x), np.arange(8) % 5)
        model.backward(loss.backward())
        sharded.step()
    total, largest = 4 * model.num_parameters(), 4 * max(b.stop - b.start for b in sharded.buckets)
    memory = sharded.held_bytes()
    assert memory["grads"] - 4 * sharded.owned.data.size == sharded.peak["grads"] <= 2 * largest
    assert memory["grads"] < total
    layer = 4 * (64 * 64 + 64)
    if stage == 3:  # this layer and the prefetched next one
        assert memory["params"] - 4 * sharded.owned.data.size == sharded.peak["params"] <= 2 * layer
        assert memory["params"] < total


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_with_accumulation_and_streamed_row_blocks(comm, monkeypatch, stage):
    monkeypatch.setattr(nn.Linear, "STREAM_BYTES", 256)
    batches = global_batches(3, comm.Get_size(), micro=2)
    reference, _ = train_distributed(comm, batches, adam, 3, micro=2, backward_passes_per_step=2)
    model, _ = train_distributed(comm, batches, adam, 3, micro=2, stage=stage, backward_passes_per_step=2,
                                 bucket_mb=0.001, buckets_in_flight=1)
    assert_identical_across_ranks(comm, model)
    assert_close(model, reference, rtol=1e-6)


def test_zero3_evaluates_and_releases_parameters(comm):
    model = nn.mlp(WIDTHS, seed=7)
    reference = nn.mlp(WIDTHS, seed=7)
    sharded = optim.ShardedOptimizer(sgd(model), model, stage=3)
    for p in model.parameters():  # released: no memory behind the placeholder
        assert p.data.strides == (0,) * p.data.ndim
    x = np.random.default_rng(0).standard_normal((5, WIDTHS[0])).astype(np.float32)
    np.testing.assert_allclose(model.eval()(x), reference.eval()(x), rtol=1e-6)
    assert all(p.data.strides == (0,) * p.data.ndim for p in model.parameters())
    assert sharded.peak["params"] <= 4 * (24 * 40 + 40 + 40 * 16 + 16)  # two layers gathered at most


def test_zero_rejects_what_it_cannot_do(comm):
    model = nn.mlp(WIDTHS, seed=7)
    with pytest.raises(ValueError, match="stage 4 is not implemented"):
        optim.ShardedOptimizer(sgd(model), model, stage=4)
    with pytest.raises(ValueError, match="compression 'fp16' is only available with stage 0 or 1"):
        optim.ShardedOptimizer(sgd(model), model, stage=2, compression="fp16")


@pytest.mark.parametrize("make_opt", [sgd, adam], ids=["sgd", "adam"])
@pytest.mark.parametrize("bucket_mb", [25.0, 0.002], ids=["one-bucket", "many-buckets"])
def test_node_shared_matches_single_rank_on_global_batch(comm, make_opt, bucket_mb):
    batches = global_batches(6, comm.Get_size())
    model, _ = train_distributed(comm, batches, make_opt, 6, node_shared=True, bucket_mb=bucket_mb)
    assert_identical_across_ranks(comm, model)
    assert_close(model, train_single(batches, make_opt, 6), rtol=2e-5)


def test_node_shared_with_accumulation_and_streamed_row_blocks(comm, monkeypatch):
    monkeypatch.setattr(nn.Linear, "STREAM_BYTES", 256)
    batches = global_batches(4, comm.Get_size(), micro=2)
    model, _ = train_distributed(comm, batches, adam, 4, micro=2, node_shared=True, backward_passes_per_step=2,
                                 bucket_mb=0.001)
    assert_identical_across_ranks(comm, model)
    assert_close(model, train_single(batches, adam, 4), rtol=2e-5)


def test_node_shared_keeps_one_copy_per_node(comm):
    """A rank's parameters and optimizer state are views of its node's single copy."""
    batches = global_batches(2, comm.Get_size())
    model, dist = train_distributed(comm, batches, adam, 2, node_shared=True, bucket_mb=0.002)
    node = ht.runtime.topology().node
    weight = model.parameters()[0].data
    state = next(iter(dist.optimizer.state.values()))["exp_avg"]
    node.Barrier()
    if node.Get_rank() == 0:
        weight[0, 0] += 1.0  # seen by every rank of the node
        state.reshape(-1)[0] = 42.0
    node.Barrier()
    assert weight[0, 0] == node.bcast(float(weight[0, 0]), root=0)
    assert state.reshape(-1)[0] == 42.0
    total = 4 * model.num_parameters()
    held = dist.held_bytes()
    assert held["params"] == total // node.Get_size() and held["state"] == 2 * total // node.Get_size()
    assert held["grads"] == total


def test_node_shared_rejects_compression(comm):
    model = nn.mlp(WIDTHS)
    with pytest.raises(ValueError, match="compression 'fp16'"):
        optim.NodeSharedOptimizer(optim.SGD(model, lr=0.1), model, compression="fp16")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_never_holds_the_whole_optimizer_state(comm, stage):
    """Measured, not tallied: tracemalloc sees every NumPy buffer this process allocates. The peak with
    Adam (8 bytes of state a parameter) minus the peak with stateless SGD is what the state adds to this
    rank's peak: about its shard (8n/p). When the whole state was created before being sharded, it was
    8n at stages 2 and 3 (measured 1.03 MB of 1.06 MB at 2 ranks)."""
    import gc
    import tracemalloc

    p = comm.Get_size()
    x = np.random.default_rng(comm.Get_rank()).standard_normal((8, 256)).astype(np.float32)

    def peak(make_opt) -> int:
        model = nn.mlp((256, 256, 256, 5), seed=1)
        loss = nn.SoftmaxCrossEntropy()
        gc.collect()
        tracemalloc.start()
        try:
            sharded = optim.ShardedOptimizer(make_opt(model), model, stage=stage, bucket_mb=0.05)
            sharded.zero_grad()
            loss.forward(model(x), np.arange(8) % 5)
            model.backward(loss.backward())
            sharded.step()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    n = nn.mlp((256, 256, 256, 5)).num_parameters()
    state = peak(adam) - peak(lambda model: optim.SGD(model, lr=0.1))
    assert 0 < state < 8 * n * (1 / p + 0.25), (state, 8 * n)


def test_zero3_keeps_no_gathered_layer_once_a_step_is_done(comm):
    """Measured with tracemalloc: what stays allocated after a stage-3 step does not grow with
    the steps, and no gathered layer survives it. The engine's flight record used to keep the
    results of its last 32 collectives, the gathered layers among them: after a few steps a
    rank held ~4 extra copies of an 18.9 M-parameter model (662 MB against 335 MB at stage 2)."""
    import gc
    import tracemalloc

    model = nn.mlp((256, 512, 512, 5), seed=1)
    layer_bytes = 4 * 512 * 512  # the largest layer, gathered whole before its forward and backward
    loss = nn.SoftmaxCrossEntropy()
    x = np.random.default_rng(comm.Get_rank()).standard_normal((8, 256)).astype(np.float32)
    gc.collect()
    tracemalloc.start()
    try:
        sharded = optim.ShardedOptimizer(adam(model), model, stage=3, bucket_mb=0.05)
        held = []
        for _ in range(6):
            sharded.zero_grad()
            loss.forward(model(x), np.arange(8) % 5)
            model.backward(loss.backward())
            sharded.step()
            gc.collect()
            held.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert max(held[1:]) - held[1] < layer_bytes // 4, held

def test_a_gradient_layout_is_passed_in_and_checked(comm):
    from hpc_train.optim.layout import lay_out

    batches = global_batches(3, comm.Get_size())
    model = nn.mlp(WIDTHS, seed=7)
    named = model.named_parameters()
    layout = lay_out(named, cap=100, split_parameters=True)  # buckets cut inside the 24x40 weight
    assert not layout.spans_one_bucket() and layout.total == model.num_parameters()
    dist = optim.DistributedOptimizer(sgd(model), model, layout=layout)
    assert dist.buckets is layout.buckets and len(layout.buckets) > 1
    loss = nn.SoftmaxCrossEntropy()
    r = comm.Get_rank()
    for x, y in batches:
        dist.zero_grad()
        loss.forward(model(x[r * PER_RANK : (r + 1) * PER_RANK]), y[r * PER_RANK : (r + 1) * PER_RANK])
        model.backward(loss.backward())
        dist.step()
    assert_close(model, train_single(batches, sgd, 3), rtol=2e-5)
    with pytest.raises(ValueError, match="opens one buffer a bucket"):
        other = nn.mlp(WIDTHS, seed=7)
        optim.ShardedOptimizer(sgd(other), other, stage=2, layout=lay_out(other.named_parameters(), 100, True))
    with pytest.raises(ValueError, match="does not match the model"):
        other = nn.mlp((24, 5))
        optim.DistributedOptimizer(sgd(other), other, layout=layout)

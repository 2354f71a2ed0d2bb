"""hpc_train.torch under mpirun: tensor collectives and DistributedOptimizer against independent references.

Every expected value is computed on each rank from every rank's inputs (which are a function of the
rank), or by one process training on the global batch with plain torch: never from our own results.
"""

from __future__ import annotations

import copy
import time

import pytest

torch = pytest.importorskip("torch")
import hpc_train.torch as htt  # noqa: E402
from hpc_train.torch.node_shared import ELEMENTWISE  # noqa: E402

pytestmark = pytest.mark.mpi(min_size=2)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}  # relative, by dtype (bfloat16: its own epsilon)


def rank_input(r: int, dtype, shape=(3, 5)) -> torch.Tensor:
    return (torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape) % 7 + r + 1).to(dtype)


# -- collectives -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float64])
@pytest.mark.parametrize("op", [htt.Sum, htt.Average, htt.Min, htt.Max, htt.Product])
def test_allreduce_keeps_dtype_shape_and_device(comm, dtype, op):
    p, r = comm.Get_size(), comm.Get_rank()
    if op == htt.Average and not dtype.is_floating_point:
        pytest.skip("the average of integers is not an integer")
    every = torch.stack([rank_input(q, torch.float64) for q in range(p)])
    expected = {htt.Sum: every.sum(0), htt.Average: every.mean(0), htt.Min: every.min(0).values,
                htt.Max: every.max(0).values, htt.Product: every.prod(0)}[op]
    x = rank_input(r, dtype)
    before = x.clone()
    result = htt.allreduce(x, op=op)
    assert result.dtype == dtype and result.shape == x.shape and result.device == x.device
    assert torch.equal(x, before)  # out of place leaves the input alone
    exact = dtype in (torch.int64, torch.float64, torch.float32) or op in (htt.Min, htt.Max)
    assert torch.allclose(result.double(), expected, rtol=0 if exact else 2e-2), (result, expected)
    inplace = rank_input(r, dtype)
    pointer = inplace.data_ptr()
    assert htt.allreduce(inplace, op=op, out=inplace) is inplace and inplace.data_ptr() == pointer
    assert torch.equal(inplace, result)
    handle = htt.allreduce_async(rank_input(r, dtype), op=op, name=f"async {dtype} {op}")
    assert torch.equal(htt.synchronize(handle), result)


def test_allreduce_of_a_strided_tensor_and_horovod_spellings(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    base = rank_input(r, torch.float32, (4, 6))
    strided = base[:, ::2]  # not contiguous: reduced through a copy, written back
    expected = sum(rank_input(q, torch.float32, (4, 6))[:, ::2] for q in range(p))
    htt.allreduce_(strided, op=htt.Sum)
    assert torch.equal(base[:, ::2], expected)
    assert torch.equal(base[:, 1::2], rank_input(r, torch.float32, (4, 6))[:, 1::2])  # the other columns untouched
    assert torch.equal(htt.allreduce(rank_input(r, torch.float32), average=False), sum(
        rank_input(q, torch.float32) for q in range(p)))
    scaled = htt.allreduce(rank_input(r, torch.float32), op=htt.Sum, prescale_factor=0.5, postscale_factor=4.0)
    assert torch.allclose(scaled, 2.0 * sum(rank_input(q, torch.float32) for q in range(p)))
    compressed = htt.allreduce(rank_input(r, torch.float32), compression=htt.Compression.fp16)
    assert compressed.dtype == torch.float32
    assert torch.allclose(compressed, sum(rank_input(q, torch.float32) for q in range(p)) / p, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_allgather_reduce_scatter_and_broadcast(comm, dtype):
    p, r = comm.Get_size(), comm.Get_rank()
    gathered = htt.allgather(rank_input(r, dtype, (r + 1, 2)))  # first dimensions differ
    assert gathered.dtype == dtype and torch.equal(gathered, torch.cat([rank_input(q, dtype, (q + 1, 2))
                                                                          for q in range(p)]))
    rows = 2 * p + 1  # uneven: the first rank takes the extra row
    mine = htt.reduce_scatter(rank_input(r, dtype, (rows, 3)), op=htt.Sum)
    total = sum(rank_input(q, torch.float64, (rows, 3)) for q in range(p))
    start = sum(rows // p + (q < rows % p) for q in range(r))
    assert mine.dtype == dtype and torch.equal(mine.double(), total[start : start + rows // p + (r < rows % p)])
    x = rank_input(r, dtype)
    copy = htt.broadcast(x, root_rank=p - 1)
    assert torch.equal(copy, rank_input(p - 1, dtype)) and torch.equal(x, rank_input(r, dtype))
    assert htt.broadcast_(x, root=p - 1) is x and torch.equal(x, rank_input(p - 1, dtype))


# -- DistributedOptimizer ----------------------------------------------------------------------------------

class Net(torch.nn.Module):
    """Linear layers with a tied weight, a frozen one, a head only rank 0 uses, one no rank uses, and
    optionally a bfloat16 layer (mixed dtypes: separate buffers)."""

    def __init__(self, bf16: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.inp = torch.nn.Linear(6, 8)
        self.mid = torch.nn.Linear(8, 8, dtype=torch.bfloat16 if bf16 else torch.float32)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.out = torch.nn.Linear(8, 6, bias=False)
        self.out.weight = self.inp.weight  # tied: (8, 6) is inp's (out, in) -> out maps 8 -> 6 transposed
        self.rank0_head = torch.nn.Linear(8, 1)
        self.unused_head = torch.nn.Linear(8, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, rank: int):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h.to(self.mid.weight.dtype)).float())
        h = torch.tanh(self.frozen(h))
        y = h @ self.inp.weight  # the tied weight used a second time
        loss = (y - x).pow(2).mean()
        if rank == 0:
            loss = loss + self.rank0_head(h).pow(2).mean()
        return loss


def batch(step: int, rank: int, micro: int = 0, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(1000 * step + 10 * rank + micro))


OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}


def train_reference(p: int, make_opt, steps: int, micro: int, bf16: bool, clip: float | None = None):
    """One process, plain torch: each pass's loss the mean over ranks of every rank's loss."""
    model = Net(bf16)
    opt = make_opt([q for q in model.parameters() if q.requires_grad])
    for step in range(steps):
        opt.zero_grad()
        for m in range(micro):
            (sum(model(batch(step, q, m), q) for q in range(p)) / p).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model, opt


def train_ours(r: int, make_opt, steps: int, micro: int, bf16: bool, accumulate: str, clip: str | None = None,
               **kwargs):
    model = Net(bf16)
    opt = htt.DistributedOptimizer(make_opt([q for q in model.parameters() if q.requires_grad]), model,
                                   backward_passes_per_step=micro if accumulate == "passes" else 1, **kwargs)
    htt.broadcast_parameters(model.state_dict(), root_rank=0)
    htt.broadcast_optimizer_state(opt, root_rank=0)
    for step in range(steps):
        opt.zero_grad()
        for m in range(micro):
            if accumulate == "no_sync" and m < micro - 1:
                with opt.no_sync():
                    model(batch(step, r, m), r).backward()
            else:
                model(batch(step, r, m), r).backward()
        if clip == "torch":  # Horovod's recipe: whole averaged gradients, then torch's own clipping
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        elif clip == "ours":
            opt.clip_grad_norm_(CLIP)
        opt.step()
    return model, opt


CLIP = 0.05  # below the gradients' norm at every step of these runs: clipping always acts
MODES = {"replicas": False, "node-shared": True}


def assert_matches_reference(comm, model, reference, bf16: bool) -> None:
    """Bitwise equal on every rank, and the one-process run's parameters within the dtype's tolerance."""
    mine = dict(model.named_parameters())
    for pname, expected in reference.named_parameters():
        got = mine[pname].detach()
        everywhere = comm.allgather(got.float().numpy().tobytes())
        assert all(b == everywhere[0] for b in everywhere), f"{pname} differs between ranks"
        # a model that computes partly in bfloat16 carries bfloat16 rounding into its float32 layers too
        tol = TOLERANCE[torch.bfloat16 if bf16 else expected.dtype]
        assert torch.allclose(got.float(), expected.detach().float(), rtol=tol, atol=tol), (
            f"{pname}: max difference {(got.float() - expected.float()).abs().max():.3g}")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("bucket_mb, micro, accumulate, bf16", [
    (25.0, 1, "passes", False),  # one bucket
    (0.0002, 1, "passes", False),  # a bucket or two a layer
    (0.0002, 3, "passes", False),  # backward_passes_per_step
    (25.0, 2, "no_sync", False),
    (0.0002, 1, "passes", True),  # float32 and bfloat16 parameters
])
def test_training_matches_one_process_on_the_global_batch(comm, mode, name, bucket_mb, micro, accumulate, bf16):
    p, r = comm.Get_size(), comm.Get_rank()
    steps = 4
    model, opt = train_ours(r, OPTIMIZERS[name], steps, micro, bf16, accumulate, bucket_mb=bucket_mb,
                            node_shared=MODES[mode])
    reference, reference_opt = train_reference(p, OPTIMIZERS[name], steps, micro, bf16)
    assert opt.node_shared == MODES[mode]
    assert len(opt.layout.buckets) == 1 if bucket_mb == 25.0 and not bf16 else len(opt.layout.buckets) > 1
    assert_matches_reference(comm, model, reference, bf16)
    assert_same_state(opt.state_dict(), reference_opt.state_dict(), bf16)  # every rank holds all of it
    assert model.unused_head.weight.grad is None  # no rank used it: no gradient, as DDP
    assert torch.equal(model.unused_head.weight, Net(bf16).unused_head.weight)  # and the optimizer left it alone
    assert model.frozen.weight.grad is None and torch.equal(model.frozen.weight, Net(bf16).frozen.weight)
    assert model.rank0_head.weight.grad is not None  # used on rank 0 only: zeros elsewhere, averaged
    opt.close()


@pytest.mark.parametrize("cls, implementation", [(cls, {}) for cls in ELEMENTWISE] + [
    (torch.optim.SGD, {"fused": True, "momentum": 0.9}), (torch.optim.AdamW, {"fused": True}),
    (torch.optim.Adam, {"foreach": True})], ids=lambda value: getattr(value, "__name__", str(value)))
def test_node_shared_steps_every_elementwise_optimizer_as_one_process_would(comm, cls, implementation):
    """With the implementation the optimizer names, which each piece's update keeps."""
    p, r = comm.Get_size(), comm.Get_rank()
    make = lambda params: cls(params, lr=0.01, **implementation)  # noqa: E731
    model, opt = train_ours(r, make, 3, 1, False, "passes", bucket_mb=0.0002, node_shared=True)
    reference, reference_opt = train_reference(p, make, 3, 1, False)
    assert_matches_reference(comm, model, reference, False)
    assert_same_state(opt.state_dict(), reference_opt.state_dict(), False)
    opt.close()


def assert_same_state(got: dict, expected: dict, bf16: bool) -> None:
    """Two optimizers' state_dicts: the same entries for the same parameters, values within tolerance."""
    assert got["param_groups"] == expected["param_groups"]
    assert sorted(got["state"]) == sorted(expected["state"])
    for index, entries in expected["state"].items():
        assert sorted(got["state"][index]) == sorted(entries), index
        for key, value in entries.items():
            tol = TOLERANCE[torch.bfloat16 if bf16 else torch.float32]
            mine = got["state"][index][key]
            assert mine.shape == value.shape and mine.dtype == value.dtype, (index, key)
            assert torch.allclose(mine.float(), value.float(), rtol=tol, atol=tol), (index, key)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("clip", ["ours", "torch"])
def test_clipping_by_global_norm_matches_torch_on_the_global_batch(comm, mode, clip):
    steps, p, r = 3, comm.Get_size(), comm.Get_rank()
    model, opt = train_ours(r, OPTIMIZERS["sgd-momentum"], steps, 1, False, "passes", clip=clip,
                            bucket_mb=0.0002, node_shared=MODES[mode])
    reference, _ = train_reference(p, OPTIMIZERS["sgd-momentum"], steps, 1, False, clip=CLIP)
    assert_matches_reference(comm, model, reference, False)
    opt.close()


@pytest.mark.parametrize("usage", ["horovod-recipe", "plain"])
@pytest.mark.parametrize("mode", list(MODES))
def test_grad_scaler_skips_a_step_on_every_rank_when_one_rank_overflows(comm, mode, usage):
    """GradScaler used plainly (scale, backward, step, update) or by Horovod's recipe (synchronize,
    unscale_, step under skip_synchronize). An infinite loss on the last rank alone at step 1 makes
    every rank skip that step and halve its scale; the run then equals plain torch on the global
    batch without that step (power-of-two scales are exact)."""
    steps, bad, p, r = 4, 1, comm.Get_size(), comm.Get_rank()
    model = Net()
    opt = htt.DistributedOptimizer(OPTIMIZERS["adam"]([q for q in model.parameters() if q.requires_grad]), model,
                                   node_shared=MODES[mode])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    for step in range(steps):
        opt.zero_grad()
        loss = model(batch(step, r), r)
        if step == bad and r == p - 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if usage == "plain":
            scaler.step(opt)
        else:
            opt.synchronize()
            scaler.unscale_(opt)
            with opt.skip_synchronize():
                scaler.step(opt)
        scaler.update()
        if step == bad:
            assert scaler.get_scale() == 2.0**7
    reference = Net()
    plain = OPTIMIZERS["adam"]([q for q in reference.parameters() if q.requires_grad])
    for step in range(steps):
        if step != bad:
            plain.zero_grad()
            (sum(reference(batch(step, q), q) for q in range(p)) / p).backward()
            plain.step()
    assert_matches_reference(comm, model, reference, False)
    opt.close()


class ConvNet(torch.nn.Module):
    """Convolution, BatchNorm2d, BatchNorm1d: what convert_sync_batchnorm and the buffer rule act on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.bn2 = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(16, 5)
        self.bn1 = torch.nn.BatchNorm1d(5, momentum=None)  # cumulative average: num_batches_tracked matters
        self.out = torch.nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(self.bn2(self.conv(x)))
        return self.out(torch.tanh(self.bn1(self.fc(h.flatten(1)))))


def images(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 * step + rank)
    return torch.randn(6, 2, 4, 4, generator=g) * (1 + rank) + rank  # ranks' batches differ in statistics


@pytest.mark.parametrize("mode", list(MODES))
def test_sync_batchnorm_equals_batchnorm_on_the_global_batch(comm, mode):
    steps, p, r = 3, comm.Get_size(), comm.Get_rank()
    model = htt.convert_sync_batchnorm(ConvNet())
    assert isinstance(model.bn2, htt.SyncBatchNorm) and isinstance(model.bn1, htt.SyncBatchNorm)
    opt = htt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                                   node_shared=MODES[mode])
    reference = ConvNet()
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        opt.zero_grad()
        model(images(step, r)).pow(2).mean().backward()
        opt.step()
        plain.zero_grad()
        reference(torch.cat([images(step, q) for q in range(p)])).pow(2).mean().backward()
        plain.step()
    assert_matches_reference(comm, model, reference, False)
    for name, expected in reference.named_buffers():
        got = dict(model.named_buffers())[name]
        assert torch.allclose(got.float(), expected.float(), rtol=1e-5, atol=1e-6), name
    model.eval()
    x = images(99, 0)
    assert torch.allclose(model(x), reference.eval()(x), rtol=1e-5, atol=1e-6)  # running statistics, no comm
    opt.close()


def test_module_buffers_follow_ddps_rule(comm):
    """Before every forward whose gradients are reduced, each rank takes rank 0's buffers. The witness
    replays that rule with plain torch in one process: one BatchNorm whose buffers, before each forward
    of rank q, are rank 0's after the previous step."""
    steps, p, r = 3, comm.Get_size(), comm.Get_rank()
    model = ConvNet()
    opt = htt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    for step in range(steps):
        opt.zero_grad()
        model(images(step, r)).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():  # no gradient, no broadcast: the buffers stay each rank's own
        model(images(steps, r))
    replay = ConvNet()
    plain = torch.optim.SGD(replay.parameters(), lr=0.1)
    rank0 = copy.deepcopy(dict(replay.named_buffers()))
    for step in range(steps):
        plain.zero_grad()
        for q in range(p):
            replay.load_state_dict({**replay.state_dict(), **rank0})
            (replay(images(step, q)).pow(2).mean() / p).backward()
            if q == 0:
                after0 = copy.deepcopy(dict(replay.named_buffers()))
            if q == r:
                mine = copy.deepcopy(dict(replay.named_buffers()))
        rank0 = after0
        plain.step()
    replay.load_state_dict({**replay.state_dict(), **mine})
    with torch.no_grad():
        replay(images(steps, r))
    mine = dict(replay.named_buffers())
    assert_matches_reference(comm, model, replay, False)
    for name, buffer in model.named_buffers():
        assert torch.allclose(buffer.float(), mine[name].float(), rtol=1e-5, atol=1e-6), name
    opt.close()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("clip", [None, "ours", "torch"])
def test_join_lets_ranks_run_out_of_data_at_different_steps(comm, mode, clip):
    """Rank q has 2 + q batches, then calls join(); the others go on. The run equals plain torch on the global
    batch of the ranks that still have data (divided by every rank, as DDP's Join), clipped if asked, and one
    more step by every rank after join() (the next epoch) still matches."""
    p, r = comm.Get_size(), comm.Get_rank()
    counts = [2 + q for q in range(p)]
    model = Net()
    opt = htt.DistributedOptimizer(OPTIMIZERS["adam"]([q for q in model.parameters() if q.requires_grad]), model,
                                   node_shared=MODES[mode], bucket_mb=0.0002)

    def our_step(step: int) -> None:
        opt.zero_grad()
        model(batch(step, r), r).backward()
        if clip == "torch":
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        elif clip == "ours":
            opt.clip_grad_norm_(CLIP)
        opt.step()

    start = time.monotonic()
    for step in range(counts[r]):
        our_step(step)
    assert opt.join() == p - 1  # the rank that trained longest
    our_step(max(counts))
    assert time.monotonic() - start < 60
    reference = Net()
    plain = OPTIMIZERS["adam"]([q for q in reference.parameters() if q.requires_grad])
    for step in range(max(counts) + 1):
        plain.zero_grad()
        training = [q for q in range(p) if step < counts[q] or step == max(counts)]
        (sum(reference(batch(step, q), q) for q in training) / p).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        plain.step()
    assert_matches_reference(comm, model, reference, False)
    assert_same_state(opt.state_dict(), plain.state_dict(), False)
    opt.close()


def test_join_with_batchnorm_buffers_does_not_hang_and_ends_alike(comm):
    """Rank 0, the usual source of the buffers, runs out first; the buffers then come from a rank still
    training, and every rank ends with the same parameters and buffers."""
    p, r = comm.Get_size(), comm.Get_rank()
    model = ConvNet()
    opt = htt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    start = time.monotonic()
    for step in range(1 + r):
        opt.zero_grad()
        model(images(step, r)).pow(2).mean().backward()
        opt.step()
    assert htt.join() == p - 1  # Horovod's spelling: the one optimizer in use
    assert time.monotonic() - start < 60
    for name, tensor in model.state_dict().items():
        everywhere = comm.allgather(tensor.float().numpy().tobytes())
        assert all(b == everywhere[0] for b in everywhere), name
    opt.close()


def test_node_shared_parameters_and_state_are_one_copy_per_node(comm):
    """A write by one rank of the node is what every rank of the node reads; resuming from a state_dict
    continues exactly as the uninterrupted run."""
    from hpc_train.runtime import topology

    node = topology().node
    model = Net()
    opt = htt.DistributedOptimizer(OPTIMIZERS["adam"]([q for q in model.parameters() if q.requires_grad]), model)
    assert opt.node_shared  # the default for an element-wise optimizer without compression
    if node.Get_rank() == 0:
        with torch.no_grad():
            model.mid.weight[0, 0] = 42.0
    node.Barrier()
    assert float(model.mid.weight.detach()[0, 0]) == 42.0
    node.Barrier()
    with torch.no_grad():
        model.mid.weight[0, 0] = Net().mid.weight[0, 0]
    r = comm.Get_rank()
    for step in range(2):
        opt.zero_grad()
        model(batch(step, r), r).backward()
        opt.step()
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    for step in range(2, 4):  # the uninterrupted run
        opt.zero_grad()
        model(batch(step, r), r).backward()
        opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    opt.close()
    resumed = Net()
    resumed.load_state_dict(saved)
    opt = htt.DistributedOptimizer(OPTIMIZERS["adam"]([q for q in resumed.parameters() if q.requires_grad]), resumed)
    opt.load_state_dict(saved_opt)
    for step in range(2, 4):
        opt.zero_grad()
        resumed(batch(step, r), r).backward()
        opt.step()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name
    opt.close()


def test_node_shared_refuses_what_it_cannot_do_and_the_default_steps_aside(comm):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"LBFGS is not one of them: pass node_shared=False"):
        htt.DistributedOptimizer(torch.optim.LBFGS(model.parameters()), model, node_shared=True)
    with pytest.raises(ValueError, match=r"compression 'fp16' needs node_shared=False"):
        htt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, compression=htt.Compression.fp16,
                                 node_shared=True)
    opt = htt.DistributedOptimizer(torch.optim.LBFGS(model.parameters(), max_iter=3), model)
    assert not opt.node_shared
    r = comm.Get_rank()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(r))

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    everywhere = comm.allgather(model.weight.detach().numpy().tobytes())
    assert all(b == everywhere[0] for b in everywhere)
    opt.close()


@pytest.mark.parametrize("mode", list(MODES))
def test_gradients_are_views_of_the_fusion_buffer_and_survive_set_to_none(comm, mode):
    r = comm.Get_rank()
    model = Net()
    opt = htt.DistributedOptimizer(torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.1),
                                   model, node_shared=MODES[mode])
    views = {name: q.grad.data_ptr() for name, q in model.named_parameters() if q.requires_grad}
    model.zero_grad(set_to_none=True)  # torch's default: our hook copies the new gradient back in
    model(batch(0, r), r).backward()
    opt.synchronize()
    used = {name: q.grad for name, q in model.named_parameters() if q.grad is not None}
    assert all(used[name].data_ptr() == views[name] for name in used)
    p = comm.Get_size()
    plain = [Net() for _ in range(p)]  # every rank's gradient, computed here with plain torch
    for q, net in enumerate(plain):
        net(batch(0, q), q).backward()
    for name, grad in used.items():
        grads = [dict(net.named_parameters())[name].grad for net in plain]
        expected = sum(torch.zeros_like(grad) if g is None else g for g in grads) / p  # unused there: zeros
        assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-7), name
    assert set(used) == {name for name, q in plain[0].named_parameters() if q.grad is not None}  # rank 0 uses most
    opt.step()
    with pytest.raises(RuntimeError, match="before step"):
        model(batch(1, r), r).backward()
        opt.zero_grad()
    opt.step()
    opt.close()


class Alternating(torch.nn.Module):
    """A head each rank uses every other step, the ranks out of phase: last step's gradient of a
    parameter this rank did not use now must count as zeros, not as what its buffer still holds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

    def forward(self, step: int, rank: int):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(100 * step + rank))
        h = torch.tanh(self.body(x))
        return h.pow(2).mean() + (self.head(h).pow(2).mean() if (step + rank) % 2 == 0 else 0)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("mode", list(MODES))
def test_zero_grad_either_way_leaves_no_stale_gradient(comm, mode, set_to_none):
    p, r = comm.Get_size(), comm.Get_rank()
    model, reference = Alternating(), Alternating()
    opt = htt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                                   node_shared=MODES[mode])
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        opt.zero_grad(set_to_none=set_to_none)
        assert all(q.grad is None if set_to_none else not q.grad.any() for q in model.parameters())
        model(step, r).backward()
        opt.step()
        plain.zero_grad()
        (sum(reference(step, q) for q in range(p)) / p).backward()
        plain.step()
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-7), name
    opt.close()


# -- bad input: the same clear error on every rank, within seconds ---------------------------------------------

def test_parameters_that_differ_between_ranks_are_named_on_every_rank(comm):
    r = comm.Get_rank()
    start = time.monotonic()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3 if r == 0 else 2))
    with pytest.raises(htt.CollectiveMismatchError, match=r"#2: rank 0 has 1.weight \(3, 4\) float32.*has 1.weight "
                                                          r"\(2, 4\) float32"):  # in the model's order
        htt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(htt.CollectiveMismatchError, match=r"#2: rank 0 has 1.bias \(3,\)"):  # in name order
        htt.broadcast_parameters(model.state_dict(), root_rank=0)
    assert time.monotonic() - start < 10


def test_optimizer_and_model_that_disagree_are_named(comm):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"1.weight, 1.bias need gradients but the optimizer does not train them"):
        htt.DistributedOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1), model)
    stranger = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"trains 2 parameter\(s\) the model does not have: \(3, 3\)"):
        htt.DistributedOptimizer(torch.optim.SGD([*model.parameters(), *stranger.parameters()], lr=0.1), model)
    opt = htt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model.add_module("late", torch.nn.Linear(2, 2))
    model[1](model[0](torch.ones(1, 4))).sum().backward()
    with pytest.raises(ValueError, match="late.weight, late.bias were added to the model after wrapping"):
        opt.step()
    opt.close()


# -- data: our loader and sampler under torch ----------------------------------------------------------------

def test_hdf5_loader_yields_tensors_sharing_its_arrays(comm, tmp_path_factory):
    import numpy as np
    from hpc_train.io.hdf5 import write_arrays

    from hpc_train.data import HDF5Loader

    directory = comm.bcast(str(tmp_path_factory.mktemp("h5")) if comm.Get_rank() == 0 else None, root=0)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (37, 4, 4, 3), dtype=np.uint8), rng.integers(0, 5, 37)
    path = f"{directory}/d.h5"
    write_arrays(path, images, labels, comm, classes=5)
    arrays = []

    def keep(images, labels):  # the arrays the loader hands over, then torch's view of them
        arrays.append(images)
        return htt.tensor_batches()(images, labels)

    with HDF5Loader(path, 8, seed=3, output=keep) as loader:
        order = loader.sampler.indices()
        batches = list(loader)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (len(order), 4, 4, 3) and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(images[order].astype(np.float32) * np.float32(2 / 255) - 1))  # to_float
    assert torch.equal(y, torch.from_numpy(labels[order]))
    assert all(b[0].data_ptr() == a.ctypes.data for b, a in zip(batches, arrays, strict=True))  # no copy


def test_distributed_sampler_drives_a_torch_dataloader_with_worker_processes(comm):
    """Our sampler as a DataLoader's sampler (set_epoch per epoch), with two forked workers started after
    MPI was initialized: every rank gets its disjoint share, and training communication still works."""
    from hpc_train.data import DistributedSampler

    p, r = comm.Get_size(), comm.Get_rank()
    n = 50
    dataset = torch.utils.data.TensorDataset(torch.arange(n))
    sampler = DistributedSampler(n, r, p, seed=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2)
    shares = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        mine = torch.cat([batch for (batch,) in loader]).tolist()
        assert mine == sampler.indices().tolist()
        shares.append(comm.allgather(mine))
        everyone = sum(shares[-1], [])
        assert set(everyone) == set(range(n)) and len(everyone) == sampler.per_rank * p  # padded by wrapping
    assert shares[0] != shares[1]  # a new permutation each epoch
    assert float(htt.allreduce(torch.ones(3), op=htt.Sum)[0]) == p  # MPI still fine after the forks

"""The torch.distributed backend "hpc" under mpirun, against gloo on the same ranks.

gloo is the independent witness: every operation runs once over "hpc" (the default group) and once
over a gloo group of the same ranks (its rendezvous through a file every rank sees), on the same
inputs, and the results must agree; DDP trains the same model over both and must give the same
losses and parameters.
"""

from __future__ import annotations

import copy
import time

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import hpc_train.torch  # noqa: E402,F401 (registers the backend)
from hpc_train.comm import CollectiveMismatchError  # noqa: E402

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def gloo(comm, tmp_path_factory):
    """The default group over "hpc", and a gloo group of every rank to compare with."""
    path = comm.bcast(str(tmp_path_factory.mktemp("store") / "store") if comm.Get_rank() == 0 else None)
    dist.init_process_group("hpc", store=dist.FileStore(path, comm.Get_size()), rank=comm.Get_rank(),
                            world_size=comm.Get_size())
    group = dist.new_group(backend="gloo")
    yield group
    dist.destroy_process_group()


def rank_tensor(r: int, shape=(3, 4), dtype=torch.float32, salt: int = 0) -> torch.Tensor:
    return ((torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape) * 7 + 3 * r + salt) % 11
            + 1).to(dtype)


def agree(ours, theirs, rtol=1e-6, atol=0.0):
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, (a, b)
        assert torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol), (a, b)


def both(gloo, operation):
    """operation(group) run over our backend, then over gloo: their outputs."""
    return operation(None), operation(gloo)


# -- every operation against gloo's ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
@pytest.mark.parametrize("op", ["SUM", "AVG", "PRODUCT", "MIN", "MAX"])
def test_all_reduce(gloo, op, dtype):
    r, p = dist.get_rank(), dist.get_world_size()
    if op == "AVG" and not dtype.is_floating_point:
        pytest.skip("the average of integers is not an integer")

    def run(group):
        t = rank_tensor(r, dtype=dtype)
        if op == "AVG" and group is gloo:  # gloo has no AVG: its sum, divided
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            return [t / p]
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op), group=group)
        return [t]

    agree(*both(gloo, run))


def test_broadcast_from_the_last_rank_also_into_a_strided_tensor(gloo):
    r, p = dist.get_rank(), dist.get_world_size()
    base = rank_tensor(r, (4, 6))
    dist.broadcast(base[:, ::2], src=p - 1)  # not contiguous: through a copy, written back
    theirs = rank_tensor(r, (4, 6))[:, ::2].contiguous()  # gloo writes strided tensors as if contiguous
    dist.broadcast(theirs, src=p - 1, group=gloo)
    agree([base[:, ::2]], [theirs], rtol=0)
    assert torch.equal(base[:, 1::2], rank_tensor(r, (4, 6))[:, 1::2])  # the other columns untouched
    agree(*both(gloo, lambda group: [dist.broadcast(t := rank_tensor(r, salt=1), src=p - 1, group=group) or t]),
          rtol=0)


def test_all_gather_both_forms(gloo):
    r, p = dist.get_rank(), dist.get_world_size()

    def run(group):
        listed = [torch.empty(3, 2) for _ in range(p)]
        dist.all_gather(listed, rank_tensor(r, (3, 2)), group=group)
        into = torch.empty(p * 3, 2)
        dist.all_gather_into_tensor(into, rank_tensor(r, (3, 2), salt=5), group=group)
        return [*listed, into]

    agree(*both(gloo, run), rtol=0)


def test_reduce_scatter_both_forms(gloo):
    r, p = dist.get_rank(), dist.get_world_size()

    def run(group):
        mine = torch.empty(2, 3)
        dist.reduce_scatter(mine, [rank_tensor(r, (2, 3), salt=q) for q in range(p)], group=group)
        share = torch.empty(5)
        dist.reduce_scatter_tensor(share, rank_tensor(r, (p * 5,)), group=group)
        return [mine, share]

    agree(*both(gloo, run))


def test_all_to_all_with_uneven_splits(gloo):
    r, p = dist.get_rank(), dist.get_world_size()
    sends = [r + 2 * q + 1 for q in range(p)]  # rows rank r sends to rank q
    receives = [q + 2 * r + 1 for q in range(p)]  # rows it gets from rank q: what q sends to r

    def run(group):
        single = torch.empty(sum(receives), 3)
        dist.all_to_all_single(single, rank_tensor(r, (sum(sends), 3)), receives, sends, group=group)
        listed = [torch.empty(2, 2, dtype=torch.int64) for _ in range(p)]  # gloo's list form: equal sizes only
        dist.all_to_all(listed, [rank_tensor(r, (2, 2), torch.int64, salt=q) for q in range(p)], group=group)
        return [single, *listed]

    agree(*both(gloo, run), rtol=0)
    uneven = [torch.empty(n, 2, dtype=torch.int64) for n in receives]  # ours also takes uneven lists
    dist.all_to_all(uneven, [rank_tensor(r, (n, 2), torch.int64, salt=q) for q, n in enumerate(sends)])
    agree(uneven, [rank_tensor(q, (n, 2), torch.int64, salt=r) for q, n in enumerate(receives)], rtol=0)


def test_gather_scatter_and_reduce_to_a_root(gloo):
    r, p = dist.get_rank(), dist.get_world_size()

    def run(group):
        gathered = [torch.zeros(2, 2) for _ in range(p)] if r == p - 1 else None
        dist.gather(rank_tensor(r, (2, 2)), gathered, dst=p - 1, group=group)
        piece = torch.zeros(3)
        dist.scatter(piece, [rank_tensor(q, (3,), salt=9) for q in range(p)] if r == 0 else None, src=0, group=group)
        reduced = rank_tensor(r, (4,))
        dist.reduce(reduced, dst=0, op=dist.ReduceOp.MAX, group=group)
        return [*(gathered or []), piece, *([reduced] if r == 0 else [])]  # elsewhere gloo leaves scratch

    agree(*both(gloo, run), rtol=0)


def test_send_and_recv_around_a_ring_posted_together(gloo):
    r, p = dist.get_rank(), dist.get_world_size()

    def run(group):
        got = torch.empty(1000, dtype=torch.float64)
        works = [dist.isend(rank_tensor(r, (1000,), torch.float64), (r + 1) % p, group=group),
                 dist.irecv(got, (r - 1) % p, group=group)]  # every rank sends first: must not deadlock
        for work in works:
            work.wait()
        return [got]

    ours, theirs = both(gloo, run)
    agree(ours, theirs, rtol=0)
    assert torch.equal(ours[0], rank_tensor((r - 1) % p, (1000,), torch.float64))


def test_subgroups_are_mpi_communicators_of_their_ranks(gloo):
    r, p = dist.get_rank(), dist.get_world_size()
    for ranks in (list(range(1, p)), list(range(0, p, 2))):
        ours, theirs = dist.new_group(ranks), dist.new_group(ranks, backend="gloo")
        if r not in ranks:
            continue

        def run(group, ranks=ranks):
            t = rank_tensor(r)
            dist.all_reduce(t, group=group)
            b = rank_tensor(r, salt=4)
            dist.broadcast(b, src=ranks[-1], group=group)
            listed = [torch.empty(3, 4) for _ in ranks]
            dist.all_gather(listed, rank_tensor(r, salt=2), group=group)
            return [t, b, *listed]

        assert dist.get_rank(ours) == ranks.index(r) and dist.get_world_size(ours) == len(ranks)
        agree(run(ours), run(theirs))


def test_asynchronous_work_and_its_future(gloo):
    r, p = dist.get_rank(), dist.get_world_size()
    t = rank_tensor(r)
    work = dist.all_reduce(t, async_op=True)
    future = work.get_future()
    doubled = future.then(lambda f: f.value()[0] * 2)  # as DDP chains its bucket callbacks
    work.wait()
    assert work.is_completed() and future.done()
    expected = sum(rank_tensor(q) for q in range(p))
    assert torch.equal(t, expected) and torch.equal(doubled.wait(), expected * 2)
    dist.barrier()


# -- errors, on every rank, instead of a hang ---------------------------------------------------------------

def test_a_collective_mismatch_raises_on_every_rank(gloo):
    r = dist.get_rank()
    started = time.perf_counter()
    with pytest.raises(CollectiveMismatchError, match="torch.distributed"):
        dist.all_reduce(torch.ones(3 + (r == 1)))  # rank 1 passes a different shape
    with pytest.raises(CollectiveMismatchError):
        if r == 0:
            dist.all_reduce(torch.ones(4))
        else:
            dist.broadcast(torch.ones(4), src=0)
    assert time.perf_counter() - started < 30
    t = torch.ones(2)
    dist.all_reduce(t)  # the group still works
    assert torch.equal(t, torch.full((2,), float(dist.get_world_size())))


def test_what_the_backend_does_not_offer_is_named(gloo):
    with pytest.raises(NotImplementedError, match="reduce op BAND is not offered"):
        dist.all_reduce(torch.ones(2, dtype=torch.int64), op=dist.ReduceOp.BAND)
    with pytest.raises(NotImplementedError, match="recv from any source"):
        dist.recv(torch.empty(1))
    dist.barrier()


# -- DDP over "hpc" equals DDP over gloo ---------------------------------------------------------------------

class Net(torch.nn.Module):
    """With `heads`: one head that only rank 0 uses and one that no rank uses (find_unused_parameters)."""

    def __init__(self, heads: bool = False):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        if heads:
            self.rank0_head = torch.nn.Linear(4, 4)
            self.unused_head = torch.nn.Linear(4, 4)

    def forward(self, x, use_rank0_head: bool = False):
        y = self.body(x)
        return self.rank0_head(y) if use_rank0_head else y


def train_ddp(group, optimizer: str, variant: str, steps: int = 5):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    r = dist.get_rank()
    torch.manual_seed(0)
    model = Net(heads=variant == "find_unused")
    ddp = DDP(copy.deepcopy(model), process_group=group, find_unused_parameters=variant == "find_unused",
              bucket_cap_mb=0.001)  # a bucket a layer or so
    if variant == "fp16_hook":
        ddp.register_comm_hook(group, default_hooks.fp16_compress_hook)
    opt = (torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(ddp.parameters(), lr=0.01))
    losses = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 * step + r)
        x, y = torch.randn(6, 8, generator=generator), torch.randn(6, 4, generator=generator)
        opt.zero_grad()
        use_head = variant == "find_unused" and r == 0
        if variant == "no_sync":
            with ddp.no_sync():  # the first half accumulates locally, the second reduces
                torch.nn.functional.mse_loss(ddp(x[:3]), y[:3]).backward()
            x, y = x[3:], y[3:]
        loss = torch.nn.functional.mse_loss(ddp(x, use_head), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses, [p.detach().clone() for p in ddp.module.parameters()]


@pytest.mark.parametrize("variant", ["plain", "find_unused", "no_sync", "fp16_hook"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_ddp_trains_as_over_gloo(gloo, optimizer, variant):
    (ours, our_params), (theirs, their_params) = both(gloo, lambda group: train_ddp(group, optimizer, variant))
    # the hook sends float16 gradients: both sum them in float16, in different orders at 3+ ranks
    rtol, atol = (1e-3, 1e-3) if variant == "fp16_hook" else (1e-5, 0.0)
    assert ours == pytest.approx(theirs, rel=rtol)
    agree(our_params, their_params, rtol=rtol, atol=atol)
    if variant == "find_unused":  # the head no rank used is left alone; the one rank 0 used was trained
        torch.manual_seed(0)
        initial = Net(heads=True)
        assert torch.equal(our_params[-2], initial.unused_head.weight.detach())
        assert not torch.equal(our_params[-4], initial.rank0_head.weight.detach())


# -- FSDP over "hpc" equals FSDP over gloo (both of PyTorch's: FullyShardedDataParallel and fully_shard) -----

def train_fsdp(group, wrapper: str, steps: int = 4):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    r = dist.get_rank()
    group = group or dist.group.WORLD
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 15), torch.nn.ReLU(), torch.nn.Linear(15, 4))  # uneven shards
    if wrapper == "FullyShardedDataParallel":
        model = FullyShardedDataParallel(model, process_group=group, device_id=torch.device("cpu"))
    else:
        mesh = DeviceMesh.from_group(group, "cpu")
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 * step + r)
        x, y = torch.randn(6, 8, generator=generator), torch.randn(6, 4, generator=generator)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    if wrapper == "FullyShardedDataParallel":
        with FullyShardedDataParallel.summon_full_params(model):
            whole = [p.detach().clone() for p in model.parameters()]
    else:
        whole = [p.full_tensor().detach().clone() for p in model.parameters()]
    return losses, whole


@pytest.mark.parametrize("wrapper", ["FullyShardedDataParallel", "fully_shard"])
def test_fsdp_trains_as_over_gloo(gloo, wrapper):
    (ours, our_params), (theirs, their_params) = both(gloo, lambda group: train_fsdp(group, wrapper))
    assert ours == pytest.approx(theirs, rel=1e-5)
    agree(our_params, their_params, rtol=1e-5)

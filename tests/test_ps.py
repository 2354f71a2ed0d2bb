"""Parameter server on MPI windows under mpirun: no lost update, the SSP bound, convergence of every mode."""

from __future__ import annotations

import numpy as np
import pytest

import hpc_train as ht
from hpc_train import nn, optim
from hpc_train.ps import ParameterServerOptimizer, ParameterStore

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.mark.parametrize("servers", [0, 1], ids=["every-rank", "one-server"])
def test_sum_of_pushes_is_exact_under_contention(comm, servers):
    p, r = comm.Get_size(), comm.Get_rank()
    n, pushes = 1001, 300  # 1001 elements: uneven slices on every server
    initial = np.arange(n, dtype=np.float32)
    store = ParameterStore(initial, comm, servers=servers)
    gradient = np.full(n, r + 1, np.float32)
    for _ in range(pushes):  # as fast as each rank can: every push races the others
        store.push(gradient)
        store.count_update()
    comm.Barrier()
    result = store.pull(np.empty(n, np.float32))
    expected = initial + pushes * sum(q + 1 for q in range(p))
    np.testing.assert_array_equal(result, expected)  # integers below 2^24: exact in float32
    assert store.updates() == pushes * p
    store.close()


def make_data(seed=3, n=512, d=20):
    """A linearly separable two-class set (labels from a random hyperplane)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal(d)
    return x, (x @ w > 0).astype(np.int64)


def full_loss(model, x, y) -> float:
    return float(nn.SoftmaxCrossEntropy().forward(model.eval()(x), y))


def shard(x, y, comm, step, batch):
    """This rank's batch of the step (every rank a different slice, cycling through the set)."""
    p, r = comm.Get_size(), comm.Get_rank()
    start = ((step * p + r) * batch) % len(x)
    index = np.arange(start, start + batch) % len(x)
    return x[index], y[index]


def run_steps(comm, opt, model, steps, batch, after_step=lambda step: None):
    x, y = make_data()
    loss = nn.SoftmaxCrossEntropy()
    for step in range(steps):
        opt.zero_grad()
        xb, yb = shard(x, y, comm, step, batch)
        loss.forward(model.train()(xb), yb)
        model.backward(loss.backward())
        opt.step()
        after_step(step)


def linear_model():
    return nn.Sequential(nn.Linear(make_data()[0].shape[1], 2, rng=0))


def train_ps(comm, mode, steps, lr, batch=16, record_every=10, watch=lambda opt: None, **kwargs):
    x, y = make_data()
    model = linear_model()
    opt = ParameterServerOptimizer(model, lr, mode, comm=comm, **kwargs)
    watch(opt)
    losses = []

    def record(step):
        if (step + 1) % record_every == 0:  # the stored (center) parameters, read by this rank alone
            losses.append(full_loss(_loaded(linear_model(), opt.store), x, y))

    run_steps(comm, opt, model, steps, batch, record)
    with opt.center_parameters():
        final = full_loss(model, x, y)
    opt.close()
    return final, losses, opt


def _loaded(model, store):
    """The model with the store's current parameters (read without any collective)."""
    flat = store.pull(np.empty(store.size, store.dtype))
    offset = 0
    for p in model.parameters():
        p.data = flat[offset : offset + p.size].reshape(p.data.shape)
        offset += p.size
    return model


def train_sync_allreduce(comm, steps, lr, batch=16):
    model = linear_model()
    run_steps(comm, optim.DistributedOptimizer(optim.SGD(model, lr), model), model, steps, batch)
    return full_loss(model, *make_data())


@pytest.mark.parametrize("mode, options", [
    ("sync", {}), ("async", {}), ("ssp", {"staleness": 2}), ("staleness_lr", {}),
    ("easgd", {"tau": 2, "alpha": 0.5}),
])
def test_every_mode_reaches_the_synchronous_loss(comm, mode, options):
    p = comm.Get_size()
    reference = train_sync_allreduce(comm, 60, lr=0.5)
    # A push applies one worker's batch, so p pushes carry the data of one synchronous step:
    # the same lr / p per push (an EASGD worker runs its own SGD at the full lr), and at most
    # 4x the synchronous run's updates.
    final, losses, _ = train_ps(comm, mode, 4 * 60, lr=0.5 if mode == "easgd" else 0.5 / p, **options)
    reached = min([final, *losses])
    assert reached <= 1.01 * reference, f"{mode}: best loss {reached:.4f}, synchronous {reference:.4f}"


def record_pushes(log: list):
    """Log (sequence, pusher's clock) for every push, in the store's own order: `count_update`
    is an atomic fetch-and-add on rank 0's counter, so its results order all workers' pushes."""

    def watch(opt):
        count = opt.store.count_update

        def counted():
            sequence = count()
            log.append((sequence, opt.steps))
            return sequence

        opt.store.count_update = counted

    return watch


def assert_ssp_bound_in_push_order(comm, log, bound):
    """Every worker's pushes gathered, then checked by `check_ssp_bound`."""
    pushes = [(seq, worker, clock) for worker, entries in enumerate(comm.allgather(log)) for seq, clock in entries]
    return check_ssp_bound(pushes, comm.Get_size(), bound)


def check_ssp_bound(pushes, workers, bound):
    """A worker may start step c only once every other worker has finished step c - bound - 1,
    push included: so in the store's order, each push at clock c follows every other worker's
    push at clock c - bound - 1. Checked from the pushes alone (sequence, worker, clock), not from
    the wait loop's records. Returns how far ahead of the slowest a worker ran."""
    pushes = sorted(pushes)
    assert [seq for seq, _, _ in pushes] == list(range(len(pushes)))  # every push counted once
    pushed = [-1] * workers  # the last clock each worker has pushed, in store order
    ahead = 0
    for seq, worker, clock in pushes:
        slowest = min(pushed[v] for v in range(workers) if v != worker)
        assert slowest >= clock - bound - 1, (f"push #{seq}: worker {worker} at clock {clock} while another "
                                              f"had pushed only up to clock {slowest} (bound {bound})")
        ahead = max(ahead, clock - 1 - slowest)
        pushed[worker] = clock
    return ahead


@pytest.mark.parametrize("bound", [0, 1, 3])
def test_ssp_never_runs_more_than_s_clocks_ahead(comm, bound):
    slow = comm.Get_size() - 1
    # The slow rank sleeps several fast steps long (a fast step over the rig's TCP, 4 ranks on 2 cores, takes
    # a few ms), so the fast ranks reach the bound within a few of its steps wherever the test runs.
    log = []
    _, _, opt = train_ps(comm, "ssp", 40, lr=0.01, record_every=10**9, staleness=bound, watch=record_pushes(log),
                         delay_s=0.02 if comm.Get_rank() == slow else 0.0)
    assert len(log) == 40
    ahead = assert_ssp_bound_in_push_order(comm, log, bound)
    if bound > 0:
        assert ahead == bound  # the fast workers did run ahead, up to the bound
    gaps = [mine - slowest for mine, slowest in opt.clock_log]  # the wait loop's own view agrees
    assert len(gaps) == 40 and max(gaps) <= bound and opt.staleness == gaps


def test_async_measures_staleness(comm):
    _, _, opt = train_ps(comm, "async", 50, lr=0.01, record_every=10**9)
    assert len(opt.staleness) == 50 and min(opt.staleness) >= 0
    total = comm.allreduce(sum(opt.staleness))
    assert total > 0  # with several workers some gradients were computed on stale parameters


def test_bad_options_are_refused(comm):
    model = nn.Sequential(nn.Linear(3, 2, rng=0))
    with pytest.raises(ValueError, match="ps.mode = 'hogwild'"):
        ParameterServerOptimizer(model, 0.1, "hogwild", comm=comm)
    with pytest.raises(ValueError, match="ps.staleness = -1"):
        ParameterServerOptimizer(model, 0.1, "ssp", staleness=-1, comm=comm)
    assert ht.size() == comm.Get_size()

"""Training against the parameter store: the modes of the parameter-server literature.

    sync          every worker pushes its step's update and waits for all others (SSP, s = 0)
    async         Hogwild-style: pull, compute, push; never wait (Recht et al. 2011)
    ssp           stale synchronous parallel: a worker at clock c may not start step c+1 while
                  any worker is below c - s (Ho et al. NIPS'13)
    easgd         elastic averaging: local parameters, every tau steps x -= a (x - center) and
                  center += a (x - center) (Zhang, Choromanska & LeCun NIPS'15, asynchronous form)
    staleness_lr  async, the learning rate divided by each gradient's measured staleness
                  (Zhang, Gupta, Lian & Liu IJCAI'16)

Staleness of a gradient = updates other workers pushed between this worker's pull and
its push (from the store's global update counter); for SSP also the clock gap to the
slowest worker when a step starts. `ParameterServerOptimizer` is a training strategy
(`optim.strategy.Strategy`: workers are not in lockstep, evaluation reads the stored
parameters) and keeps per-step staleness records.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from ..comm import broadcast
from .store import ParameterStore

MODES = ("sync", "async", "ssp", "easgd", "staleness_lr")


def staleness_summary(values: list[int]) -> dict:
    """Mean, max and a histogram ({staleness: count}) of per-step staleness values."""
    if not values:
        return {"mean": 0.0, "max": 0, "histogram": {}}
    counts = np.bincount(np.asarray(values, np.int64))
    return {"mean": float(np.mean(values)), "max": int(max(values)),
            "histogram": {str(k): int(c) for k, c in enumerate(counts) if c}}


class ParameterServerOptimizer:
    """SGD through the store: the push is the update, stored -= lr * v, where v is the
    gradient or, with momentum, this worker's own momentum buffer (v = momentum * v + g).

    Parameters and gradients are re-pointed into two flat local buffers, so a pull
    lands straight in the model and a push sends one array. Rank 0's initial
    parameters seed the store.
    """

    def __init__(self, model, lr, mode: str = "async", staleness: int = 2, tau: int = 4, alpha: float = 0.5,
                 servers: int = 0, momentum: float = 0.0, comm=None, timeline=None, delay_s: float = 0.0):
        from .. import runtime

        if mode not in MODES:
            raise ValueError(f"ps.mode = {mode!r}: expected one of {MODES}")
        if staleness < 0:
            raise ValueError(f"ps.staleness = {staleness}: must be >= 0")
        if tau < 1 or not 0 < alpha <= 1:
            raise ValueError(f"ps.tau = {tau}, ps.alpha = {alpha}: need tau >= 1 and 0 < alpha <= 1")
        self.model, self.mode = model, mode
        self.bound = 0 if mode == "sync" else staleness
        self.tau, self.alpha = tau, alpha
        self.schedule = lr if callable(lr) else (lambda _step, value=float(lr): value)
        self.comm = comm or runtime.world()
        self.timeline = timeline
        self.delay_s = delay_s  # an artificial straggler: sleep this long every step (benchmarks, tests)
        named = model.named_parameters()
        dtype = next(iter(named.values())).data.dtype
        total = sum(p.size for p in named.values())
        self.params, self.grads = np.empty(total, dtype), np.zeros(total, dtype)
        self.momentum = momentum
        self.velocity = np.zeros(total, dtype) if momentum else None
        offset = 0
        for p in named.values():
            view = self.params[offset : offset + p.size].reshape(p.data.shape)
            view[...] = p.data
            p.data = view
            p.grad = self.grads[offset : offset + p.size].reshape(p.data.shape)
            offset += p.size
        self._named = named
        broadcast(self.params, root=0, name="ps-initial-parameters")
        self.store = ParameterStore(self.params, self.comm, servers)
        self.steps = 0
        self.passes_per_step = 1
        self.exposed_s = 0.0
        self.staleness: list[int] = []  # one value per step
        self.clock_log: list[tuple[int, int]] = []  # (this worker's clock, slowest clock) at each step start
        self._updates_at_pull = 0

    @property
    def lr(self) -> float:
        return self.schedule(self.steps)

    def _record(self, name: str, start: float, end: float) -> None:
        if self.timeline is not None:
            self.timeline.add(name, "comm", start, end, "main")

    def zero_grad(self) -> None:
        """Start a step: wait as the mode requires, then pull the parameters to compute on."""
        for p in self._named.values():
            p.zero_grad()
        started = time.perf_counter()
        if self.mode in ("sync", "ssp"):
            self._wait_for_slowest()
        if self.mode != "easgd":
            pulled = time.perf_counter()
            self._updates_at_pull = self.store.updates()
            self.store.pull(self.params)
            self._record("pull", pulled, time.perf_counter())
        self.exposed_s = time.perf_counter() - started

    def _wait_for_slowest(self) -> None:
        start = time.perf_counter()
        while True:
            clocks = self.store.clocks()
            if clocks.min() >= self.steps - self.bound:
                break
            time.sleep(0.0002)
        self.clock_log.append((self.steps, int(clocks.min())))
        self.staleness.append(int(self.steps - clocks.min()))
        if time.perf_counter() - start > 1e-4:
            self._record(f"ssp wait (bound {self.bound})", start, time.perf_counter())

    def step(self) -> None:
        """Push this step's update (or, for EASGD, update locally and exchange every tau steps)."""
        if self.delay_s:
            time.sleep(self.delay_s)
        started = time.perf_counter()
        for p in self._named.values():
            p.materialize()
        lr = self.lr
        update = self.grads
        if self.velocity is not None:
            self.velocity *= self.momentum
            self.velocity += self.grads
            update = self.velocity
        if self.mode == "easgd":
            self.params -= lr * update
            if (self.steps + 1) % self.tau == 0:
                self._exchange_with_center()
            self.staleness.append(0)
        else:
            stale = self.store.updates() - self._updates_at_pull
            if self.mode == "staleness_lr":
                lr = lr / max(1, stale)
            self.store.push(-lr * update)
            sequence = self.store.count_update()
            if self.mode in ("async", "staleness_lr"):
                self.staleness.append(stale)
        self.store.tick()
        # The store's sequence number orders every worker's pushes: a timeline reader can check the
        # SSP bound from these spans alone, independently of the wait loop.
        pushed = f"push #{sequence} at clock {self.steps}" if self.mode != "easgd" else "local step"
        self.steps += 1
        self._record(f"{pushed} (staleness {self.staleness[-1] if self.staleness else 0})", started,
                     time.perf_counter())
        self.exposed_s += time.perf_counter() - started

    def _exchange_with_center(self) -> None:
        center = self.store.pull(np.empty_like(self.params))
        elastic = self.alpha * (self.params - center)
        self.params -= elastic
        self.store.push(elastic)
        self.store.count_update()

    lockstep = False  # every worker runs at its own pace: no collective between steps
    can_checkpoint = False  # the parameters live in MPI windows across the servers

    def agree_to_stop(self, signum: int) -> int:
        """A worker that received a signal stops and says so in its clock; the others read it there."""
        if signum:
            self.store.stop(signum)
            return signum
        return self.store.stop_signal()

    def step_metrics(self, steps: int) -> dict:
        return {"staleness": staleness_summary(self.staleness[len(self.staleness) - steps:])}

    def run_metrics(self) -> dict:
        return {"ps_mode": self.mode, "staleness": staleness_summary(self.staleness)}

    def checkpoint_arrays(self, *_):
        raise NotImplementedError("checkpoints of parameter-server training are not implemented (the store's "
                                  "parameters live in MPI windows across the servers)")

    checkpoint_layout = load_checkpoint = checkpoint_arrays

    def evaluation_parameters(self):
        return self.center_parameters()

    @contextlib.contextmanager
    def center_parameters(self):
        """The model holds the stored (center) parameters inside the block, once every worker has
        pushed all it had (collective); an EASGD worker gets its local parameters back after."""
        self.comm.Barrier()
        local = self.params.copy() if self.mode == "easgd" else None
        self.store.pull(self.params)
        try:
            yield
        finally:
            self.comm.Barrier()  # nobody pushes again before every rank has read
            if local is not None:
                self.params[...] = local

    def close(self) -> None:
        self.store.close()

"""The strategy of a job, built from its [optimizer], [schedule], [distributed] and [ps] sections.

`STRATEGIES` is the registry: name -> builder(module, job, schedule, timeline). When to use which:

    data-parallel   a replica of parameters and optimizer state per rank; gradients averaged by
                    fused allreduce while backward runs; the only one with gradient compression
    node-shared     one copy per node in shared memory, each rank reduces and updates its piece
                    (the default for plain data parallel: less memory traffic per node)
    zero-1/2/3      ZeRO: optimizer state (1), + gradients (2), + parameters (3) sharded over ranks
    parameter-server  workers push updates to a sharded store at their own pace ([ps] mode)

Adding a strategy: its class in its own module (the `Strategy` protocol of strategy.py), a
builder here, one line in STRATEGIES, and a rule in `strategy_name`.
"""

from __future__ import annotations

from .distributed import DistributedOptimizer
from .node_shared import NodeSharedOptimizer
from .optimizers import SGD, Adam
from .schedules import constant, linear_scaling, warmup_cosine, warmup_step
from .sharded import ShardedOptimizer

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")


def build_schedule(job, total_steps: int):
    """The learning rate as a function of the step: [schedule] over [optimizer].lr."""
    s = job.schedule
    base_lr = job.optimizer.lr
    if s.scale_with_batch:
        base_lr = linear_scaling(base_lr, job.train.global_batch, s.reference_batch)
    if s.name == "cosine":
        return warmup_cosine(base_lr, max(total_steps, s.warmup_steps + 1), s.warmup_steps, s.min_lr)
    if s.name == "step":
        return warmup_step(base_lr, s.step_size, s.gamma, s.warmup_steps)
    return constant(base_lr)


def build_optimizer(job, params, schedule):
    """The local optimizer of [optimizer] on `params` (a model or name -> Parameter)."""
    o = job.optimizer
    if o.name == "sgd":
        return SGD(params, schedule, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    return Adam(params, schedule, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                decoupled=o.name == "adamw")


def _wrapper_options(job, timeline) -> dict:
    dist = job.distributed
    return dict(bucket_mb=dist.bucket_mb,
                compression=None if dist.compression == "none" else dist.compression,
                backward_passes_per_step=dist.backward_passes_per_step,
                stall_warning_s=dist.stall_warning_s, stall_abort_s=dist.stall_abort_s, timeline=timeline)


def _data_parallel(module, job, schedule, timeline):
    return DistributedOptimizer(build_optimizer(job, module, schedule), module, **_wrapper_options(job, timeline))


def _node_shared(module, job, schedule, timeline):
    return NodeSharedOptimizer(build_optimizer(job, module, schedule), module, **_wrapper_options(job, timeline))


def _zero(stage: int):
    def build(module, job, schedule, timeline):
        return ShardedOptimizer(build_optimizer(job, module, schedule), module, stage=stage,
                                **_wrapper_options(job, timeline))
    return build


def _parameter_server(module, job, schedule, timeline):
    from .. import runtime
    from ..ps import ParameterServerOptimizer

    ps = job.ps
    slow = runtime.rank() == ps.slow_rank
    return ParameterServerOptimizer(module, schedule, ps.mode, staleness=ps.staleness, tau=ps.tau,
                                    alpha=ps.alpha, servers=ps.servers, momentum=job.optimizer.momentum,
                                    timeline=timeline, delay_s=ps.slow_by_s if slow else 0.0)


STRATEGIES = {
    "data-parallel": _data_parallel,
    "node-shared": _node_shared,
    "zero-1": _zero(1),
    "zero-2": _zero(2),
    "zero-3": _zero(3),
    "parameter-server": _parameter_server,
}


def uses_node_shared(job) -> bool:
    """Whether the job's data parallelism keeps one copy per node: asked for, and plain data
    parallel (no compression, no ZeRO, no parameter server)."""
    dist = job.distributed
    return bool(dist.node_shared and dist.compression == "none" and not dist.zero_stage
                and not job.ps.mode)


def strategy_name(job) -> str:
    """Which entry of STRATEGIES the job asks for."""
    if job.ps.mode:
        return "parameter-server"
    if job.distributed.zero_stage:
        return f"zero-{job.distributed.zero_stage}"
    return "node-shared" if uses_node_shared(job) else "data-parallel"


def build_strategy(job, module, total_steps: int, timeline=None):
    """The job's strategy around `module` (the framework's model: parameters by name, gradient hooks)."""
    return STRATEGIES[strategy_name(job)](module, job, build_schedule(job, total_steps), timeline)

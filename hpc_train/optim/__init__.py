"""Optimizers, learning-rate schedules and data-parallel wrapping."""

from .distributed import DistributedOptimizer, broadcast_optimizer_state, broadcast_parameters
from .node_shared import NodeSharedOptimizer
from .optimizers import SGD, Adam, AdamW, Optimizer
from .schedules import constant, linear_scaling, warmup_cosine, warmup_step
from .sharded import ShardedOptimizer

__all__ = [
    "SGD", "Adam", "AdamW", "DistributedOptimizer", "NodeSharedOptimizer", "Optimizer", "ShardedOptimizer",
    "broadcast_optimizer_state", "broadcast_parameters", "constant", "linear_scaling", "warmup_cosine", "warmup_step",
]

"""Optimizers, learning-rate schedules and data-parallel wrapping."""

from .distributed import DistributedOptimizer, broadcast_optimizer_state, broadcast_parameters
from .factory import STRATEGIES, build_optimizer, build_schedule, build_strategy, strategy_name
from .node_shared import NodeSharedOptimizer
from .optimizers import SGD, Adam, AdamW, Optimizer
from .schedules import constant, linear_scaling, warmup_cosine, warmup_step
from .sharded import ShardedOptimizer
from .strategy import Strategy

__all__ = [
    "SGD", "STRATEGIES", "Adam", "AdamW", "DistributedOptimizer", "NodeSharedOptimizer", "Optimizer",
    "ShardedOptimizer", "Strategy", "broadcast_optimizer_state", "broadcast_parameters", "build_optimizer",
    "build_schedule", "build_strategy", "strategy_name", "constant", "linear_scaling", "warmup_cosine", "warmup_step",
]

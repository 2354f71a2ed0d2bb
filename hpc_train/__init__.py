"""hpc_train: MPI-based toolkit for training models on HPC machines.

Every rank runs the same program: `import hpc_train as ht; ht.init()`, then
`ht.allreduce(grad, op="mean")` and friends. MPI is initialized by `init()` (or
the first collective), not by importing this package.
"""

from . import preemption
from .comm import (
    CollectiveMismatchError,
    allgather,
    allreduce,
    allreduce_async,
    broadcast,
    reduce_scatter,
    shared_empty,
)
from .optim import DistributedOptimizer, NodeSharedOptimizer, ShardedOptimizer, broadcast_parameters
from .preemption import preempted
from .runtime import init, local_rank, local_size, node_index, num_nodes, rank, size

__version__ = "0.1.0"

__all__ = [
    "CollectiveMismatchError", "DistributedOptimizer", "NodeSharedOptimizer", "allgather", "allreduce",
    "allreduce_async", "broadcast", "broadcast_parameters", "init", "local_rank", "local_size", "node_index",
    "num_nodes", "preempted", "preemption", "ShardedOptimizer", "rank", "reduce_scatter", "shared_empty", "size",
]

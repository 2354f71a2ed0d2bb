"""hpc_train for PyTorch: our collectives, fusion buffers and engine under a torch training script.

    import hpc_train.torch as htt          # or: import hpc_train.torch as hvd (Horovod's names)
    htt.init()
    opt = htt.DistributedOptimizer(torch.optim.AdamW(model.parameters()), model)
    htt.broadcast_parameters(model.state_dict(), root=0); htt.broadcast_optimizer_state(opt, root=0)

Importing it also registers the torch.distributed backend "hpc", so that an unchanged DDP or FSDP
script runs over our collectives: `torch.distributed.init_process_group(backend="hpc")`.

Launched like any hpc_train program (mpirun, srun). PyTorch is an optional extra:
`pip install 'hpc_train[torch]'`.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401 (the extra's presence, checked once with a message that says what to install)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("hpc_train.torch needs PyTorch: pip install 'hpc_train[torch]' (a CPU-only machine: "
                      "pip install torch --index-url https://download.pytorch.org/whl/cpu first)") from error

from ..comm import CollectiveMismatchError
from ..runtime import init, local_rank, local_size, rank, size
from ..runtime import node_index as cross_rank
from ..runtime import num_nodes as cross_size
from .batchnorm import SyncBatchNorm, convert_sync_batchnorm
from .collectives import (
    Average,
    Compression,
    Handle,
    Max,
    Min,
    Product,
    Sum,
    allgather,
    allreduce,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    broadcast,
    broadcast_,
    poll,
    reduce_scatter,
    reducescatter,
    synchronize,
)
from .optimizer import DistributedOptimizer, join
from .process_group import register as _register_backend
from .rendezvous import install as _take_rank_and_size_from_mpi
from .state import broadcast_optimizer_state, broadcast_parameters
from .tensors import tensor_batches

_register_backend()
_take_rank_and_size_from_mpi()

__all__ = [
    "Average", "CollectiveMismatchError", "Compression", "DistributedOptimizer", "Handle", "Max", "Min", "Product",
    "Sum", "SyncBatchNorm", "allgather", "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "broadcast", "broadcast_", "broadcast_optimizer_state", "broadcast_parameters", "convert_sync_batchnorm",
    "cross_rank", "cross_size", "init", "join", "local_rank", "local_size", "poll", "rank", "reduce_scatter",
    "reducescatter", "size", "synchronize", "tensor_batches",
]

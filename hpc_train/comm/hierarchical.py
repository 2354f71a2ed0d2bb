"""Hierarchical allreduce: shared memory inside each node, rings across nodes.

With the same number of ranks on every node, local rank l owns slice l of each
node-reduced chunk and reduces it with local rank l of every other node (one ring
per slice, all running at once, so every rank's link carries 1/ppn of the data);
the shm copy-out then acts as the node broadcast. With uneven nodes, the node
result is reduced among node leaders and broadcast inside each node.
"""

from __future__ import annotations

import numpy as np

from . import ring
from .ops import ReduceOp


def inter_node_hook(group, op: ReduceOp):
    """Per-slice ring across nodes, or None when there is a single node."""
    topology = group.topology
    if topology.num_nodes == 1:
        return None
    if not topology.uniform:
        raise ValueError("per-slice rings need the same number of ranks on every node")
    return lambda piece: ring.allreduce(group, piece, piece, op, comm=topology.cross)


def allreduce(group, send, recv, op: ReduceOp, xp=np) -> None:
    topology = group.topology
    window = group.node_window()
    if topology.uniform:
        window.allreduce(send, recv, op, inter_node=inter_node_hook(group, op))
        return
    window.allreduce(send, recv, op)
    if topology.node.Get_rank() == 0:
        ring.allreduce(group, recv, recv, op, comm=topology.leaders)
    from mpi4py import MPI

    topology.node.Bcast([recv.view(np.uint8), MPI.BYTE], root=0)

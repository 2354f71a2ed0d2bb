"""Hierarchical allreduce: shared memory inside each node, rings across nodes.

With the same number of ranks on every node, local rank l owns slice l of each
node-reduced chunk and reduces it with local rank l of every other node (one ring
per slice, all running at once, so every rank's link carries 1/ppn of the data);
the shm copy-out then acts as the node broadcast. With uneven nodes, the node
result is reduced among node leaders and broadcast inside each node. On a single
node this is exactly `shm`.
"""

from __future__ import annotations

import numpy as np

from . import ring
from .ops import ReduceOp
from .shm import allreduce_shared


def inter_node_hook(group, op: ReduceOp):
    """Per-slice ring across nodes (equal nodes), or None (single node or uneven nodes)."""
    topology = group.topology
    if topology.num_nodes == 1 or not topology.uniform:
        return None
    return lambda piece: ring.allreduce(group, piece, piece, op, comm=topology.cross)


def _across_leaders(group, buf, op: ReduceOp) -> None:
    """Uneven nodes: reduce node results among node leaders, then broadcast inside each node."""
    from mpi4py import MPI

    topology = group.topology
    if topology.num_nodes == 1 or topology.uniform:
        return
    if topology.node.Get_rank() == 0:
        ring.allreduce(group, buf, buf, op, comm=topology.leaders)
    topology.node.Bcast([buf.view(np.uint8), MPI.BYTE], root=0)


def allreduce(group, send, recv, op: ReduceOp, xp=np) -> None:
    group.node_window().allreduce(send, recv, op, inter_node=inter_node_hook(group, op))
    _across_leaders(group, recv, op)


def allreduce_in_shared(group, array, offset: int, op: ReduceOp) -> None:
    """In-place allreduce of a node-shared array (see shm.allreduce_shared), across nodes too."""
    allreduce_shared(array._shared, offset, array, op, inter_node=inter_node_hook(group, op))
    _across_leaders(group, array.reshape(-1), op)

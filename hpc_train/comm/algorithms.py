"""The registry of allreduce algorithms: one entry each, everything else derives from it.

`allreduce(..., algorithm=NAME)` dispatches through `ALLREDUCE[NAME].run`; the names
`hpc-train bench allreduce` accepts, the vocabulary of `auto`'s tables, the check that
an algorithm can run on this communicator, the device-memory rule and the cost model of
`hpc-train scale` all read these entries. When to use which:

    mpi           the MPI library's own Allreduce: the baseline, and the one for device memory
                  without a ring (CUDA-aware MPI); best for small messages across nodes
    ring          reduce-scatter + allgather over Sendrecv, bandwidth-optimal (2(p-1)/p n bytes a
                  rank); large messages, device memory, any topology
    shm           the node's ranks reduce in a shared window, in place for node-shared input;
                  every rank on one node
    hierarchical  shm inside each node, one ring per local rank across nodes, shm broadcast back

Adding an algorithm: its module with `allreduce(group, send, recv, op, xp)` (send may be
recv), one `Algorithm` line below, and, to predict it, its cost form in `scaling.model`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import hierarchical, mpi_algo, ring


def _shm(group, send, recv, op, xp=None) -> None:
    group.node_window().allreduce(send, recv, op)


@dataclass(frozen=True)
class Algorithm:
    """An allreduce algorithm and what the rest of the library needs to know about it.

    - `run(group, send, recv, op, xp)`: reduce flat contiguous `send` into `recv` (may be `send`).
    - `one_node`: needs every rank on one node; `across_nodes` is what stands in for it (auto)
      when the communicator spans nodes, `on_one_node` what it reduces to on a single node.
    - `device`: runs on device memory directly when MPI is CUDA-aware (others stage through the host).
    - `node_window`: reduces through the node's shared window: node-shared input in place with no
      copy, and the C flag path for small messages on one node.
    - `cost`: its alpha-beta-gamma form in `scaling.model.ALLREDUCE_COSTS`; `fitted`: a link is
      fitted to its benchmark rows (composite algorithms are costed from their parts).
    """

    name: str
    run: Callable
    one_node: bool = False
    across_nodes: str | None = None
    on_one_node: str | None = None
    device: bool = False
    node_window: bool = False
    cost: str = ""
    fitted: bool = True


ALLREDUCE = {a.name: a for a in (
    Algorithm("mpi", mpi_algo.allreduce, device=True, cost="mpi"),
    Algorithm("ring", ring.allreduce, device=True, cost="ring"),
    Algorithm("shm", _shm, one_node=True, across_nodes="hierarchical", node_window=True, cost="shm"),
    Algorithm("hierarchical", hierarchical.allreduce, on_one_node="shm", node_window=True, cost="hierarchical",
              fitted=False),
)}
ALGORITHMS = ("auto", *ALLREDUCE)  # what a caller may ask for: a registered algorithm, or auto's choice

# Reduce-scatter and allgather (blocks of `counts` elements) come in the MPI library's and the ring's forms,
# all with one argument order: (group, send, recv, counts, op, xp) and (group, send, recv, counts, offsets).
REDUCE_SCATTER = {"mpi": mpi_algo.reduce_scatter, "ring": ring.reduce_scatter_blocks}
ALLGATHER = {"mpi": mpi_algo.allgather, "ring": ring.allgather_into}
BLOCK_ALGORITHMS = ("auto", *REDUCE_SCATTER)  # `auto` is the MPI library's


def for_topology(name: str, num_nodes: int) -> str:
    """The registered algorithm that does `name`'s job on this many nodes (auto's tables name
    `shm` for a node's share of the work; across nodes that is `hierarchical`)."""
    algorithm = ALLREDUCE[name]
    if num_nodes > 1 and algorithm.one_node and algorithm.across_nodes:
        return algorithm.across_nodes
    if num_nodes == 1 and algorithm.on_one_node:
        return algorithm.on_one_node
    return name

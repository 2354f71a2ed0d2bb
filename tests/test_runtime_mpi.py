"""Runtime topology under mpirun, with and without pretended node boundaries."""

from __future__ import annotations

import os

import pytest

import hpc_train as ht
from hpc_train import runtime

pytestmark = pytest.mark.mpi(min_size=2)


def test_init_is_idempotent(comm):
    assert runtime.init() is runtime.init()
    assert ht.rank() == comm.Get_rank() and ht.size() == comm.Get_size()


def test_topology_matches_launcher(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    per_node = os.environ.get("HPC_TRAIN_RANKS_PER_NODE")
    if per_node:
        k = int(per_node)
        assert ht.local_rank() == r % k
        assert ht.node_index() == r // k
        assert ht.num_nodes() == -(-p // k)
        assert runtime.topology().pretended
    else:
        # all ranks of these tests share one host; the launcher says which local rank this is
        launcher_says = next(os.environ[v] for v in runtime.LOCAL_RANK_VARIABLES if v in os.environ)
        assert ht.local_rank() == int(launcher_says)
        assert ht.local_size() == p and ht.num_nodes() == 1 and ht.node_index() == 0
    topo = runtime.topology()
    assert sum(topo.node_sizes) == p
    assert topo.cross.Get_size() == sum(1 for s in topo.node_sizes if s > ht.local_rank())
    assert (topo.leaders.Get_size() == ht.num_nodes()) if ht.local_rank() == 0 else True

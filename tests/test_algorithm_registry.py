"""The allreduce registry is the one place an algorithm is declared: one entry makes it callable by
name, valid in auto's tables and priced by the cost model."""

from __future__ import annotations

import numpy as np
import pytest

import hpc_train as ht
from hpc_train.comm import ALLREDUCE, Algorithm, algorithms, auto, mpi_algo
from hpc_train.scaling import model as cost_model

pytestmark = pytest.mark.mpi(min_size=2)


def test_one_registry_entry_is_all_a_new_algorithm_needs(comm, monkeypatch):
    calls = []

    def traced(group, send, recv, op, xp=np):
        calls.append(send.size)
        mpi_algo.allreduce(group, send, recv, op, xp)

    monkeypatch.setitem(algorithms.ALLREDUCE, "traced", Algorithm("traced", traced, device=True, cost="mpi"))
    x = np.arange(10, dtype=np.float32) + comm.Get_rank()
    p = comm.Get_size()
    expected = p * np.arange(10, dtype=np.float32) + p * (p - 1) / 2
    np.testing.assert_array_equal(ht.allreduce(x, algorithm="traced"), expected)
    assert calls == [10]
    auto.validate_table({"1x2": [[None, "traced"]]}, "table.json")
    link = cost_model.Link(alpha=1e-6, beta=1e-10)
    model = cost_model.Model(gamma=1e-10, links={cost_model.INTRA: {"mpi": link}, cost_model.INTER: {"mpi": link}})
    assert cost_model.allreduce_costs(model, 1, 2, 1e6)["traced"] == cost_model.allreduce_costs(model, 1, 2, 1e6)["mpi"]


def test_unknown_names_list_the_registry(comm):
    with pytest.raises(ValueError, match=r"unknown algorithm 'nccl'; expected one of \('auto', 'mpi', 'ring'"):
        ht.allreduce(np.ones(4, np.float32), algorithm="nccl")
    with pytest.raises(ValueError, match="one of"):
        auto.validate_table({"1x2": [[None, "nccl"]]}, "table.json")
    assert set(ALLREDUCE) == {"mpi", "ring", "shm", "hierarchical"}

"""Tests that need no mpirun: units, backend detection, auto tables, runtime helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hpc_train import backend, runtime
from hpc_train.comm import auto, partition
from hpc_train.units import format_size, parse_size


@pytest.mark.parametrize("text, value", [("8", 8), ("4k", 4096), ("1M", 1 << 20), ("256MiB", 256 << 20),
                                         ("1g", 1 << 30), (64, 64)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="'12q'"):
        parse_size("12q")


def test_format_size():
    assert [format_size(n) for n in (1000, 4096, 1 << 20, 3 << 30)] == ["1000", "4K", "1M", "3G"]


def test_partition_spreads_remainder_first():
    assert partition(10, 4) == ([3, 3, 2, 2], [0, 3, 6, 8])
    assert partition(2, 4) == ([1, 1, 0, 0], [0, 1, 2, 2])
    assert partition(0, 3) == ([0, 0, 0], [0, 0, 0])


class DlpackOnly:
    """A host array that only speaks DLPack (as a framework tensor would)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class FakeDeviceArray:
    __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (0, False), "version": 3}


def test_xp_of_and_as_array():
    a = np.arange(4.0)
    assert backend.xp_of(a) is np
    view = backend.as_array(DlpackOnly(a))
    assert isinstance(view, np.ndarray) and np.shares_memory(view, a)
    assert backend.as_array([1, 2]).tolist() == [1, 2]


def test_device_arrays_are_recognised():
    assert backend.is_device_array(FakeDeviceArray())
    assert not backend.is_device_array(np.zeros(2))
    if backend.cupy_module() is None:
        with pytest.raises(TypeError, match="cupy is not installed"):
            backend.xp_of(FakeDeviceArray())


def test_cuda_awareness_override(monkeypatch):
    backend.cuda_awareness.cache_clear()
    monkeypatch.setenv("HPC_TRAIN_CUDA_AWARE", "1")
    assert backend.cuda_awareness() == backend.CudaAwareness(True, "environment HPC_TRAIN_CUDA_AWARE=1")
    backend.cuda_awareness.cache_clear()
    monkeypatch.setenv("HPC_TRAIN_CUDA_AWARE", "yes")
    with pytest.raises(ValueError, match="expected 0 or 1"):
        backend.cuda_awareness()
    backend.cuda_awareness.cache_clear()
    monkeypatch.delenv("HPC_TRAIN_CUDA_AWARE")
    detected = backend.cuda_awareness()
    backend.cuda_awareness.cache_clear()
    # Debian's Open MPI is built without CUDA: detection must say so and how it knows.
    assert detected.aware is False and "mpi_built_with_cuda_support" in detected.how


def test_env_local_rank(monkeypatch):
    for name in runtime.LOCAL_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert runtime.env_local_rank() is None
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert runtime.env_local_rank() == 3
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert runtime.env_local_rank() == 1  # the launcher's own variable wins


def test_pretended_ranks_per_node_validated(monkeypatch):
    monkeypatch.setenv("HPC_TRAIN_RANKS_PER_NODE", "0")
    with pytest.raises(ValueError, match="HPC_TRAIN_RANKS_PER_NODE='0'"):
        runtime.pretended_ranks_per_node()


def test_auto_table_round_trip(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    auto.save_table(path, "1x2", [[65536, "mpi"], [None, "ring"]], {"why": "test"})
    monkeypatch.setenv(auto.TUNING_VARIABLE, str(path))
    auto.forget_choices()

    class Topo:
        uniform, num_nodes, node_sizes, oversubscribed = True, 1, (2,), False

    try:
        assert auto.choose(1024, Topo) == "mpi"
        assert auto.choose(1 << 20, Topo) == "ring"
    finally:
        auto.forget_choices()


def test_auto_table_rejects_bad_files(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"tables": {"1x2": [[1024, "mpi"], [2048, "nccl"]]}}))
    with pytest.raises(ValueError, match="bad.json.*nccl"):
        auto.read_table(path)
    path.write_text(json.dumps({"tables": {"1x2": [[1024, "mpi"]]}}))
    with pytest.raises(ValueError, match="must end with a \\[null, algorithm\\] rule"):
        auto.read_table(path)


def test_import_does_not_initialize_mpi():
    """GPU binding needs the local rank before MPI_Init: importing must not start MPI."""
    probe = ("import sys, hpc_train\n"
             "assert 'mpi4py.MPI' not in sys.modules, 'import hpc_train initialized MPI'\n"
             "print(hpc_train.local_rank())")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMPI_COMM_WORLD_LOCAL_RANK": "5"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "5"

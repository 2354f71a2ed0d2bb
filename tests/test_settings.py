"""HPC_TRAIN_* variables: read in one module, agreed across ranks at init, bad values named on every rank."""

from __future__ import annotations

import sys
import time

import pytest

from hpc_train import settings

from .conftest import run_mpi

# Rank 0 prints every rank's view on one line: two ranks printing their own lines may interleave
# inside a line on mpirun's forwarded stdout (seen once in CI).
SHOW = ("import hpc_train as ht; from hpc_train import settings; from mpi4py import MPI; ht.init(); "
        "s = settings.current(); "
        "views = MPI.COMM_WORLD.gather([str(v) for v in (s.check, s.ring_segment, s.ranks_per_node, ht.num_nodes())]); "
        "print(views if ht.rank() == 0 else '', end='', flush=True)")


def on_rank_one(exports: str, code: str) -> list[str]:
    """mpirun -n 2 where only rank 1's environment has `exports`."""
    script = (f'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then export {exports}; fi; '
              f'exec "{sys.executable}" -c "$0"')
    return ["bash", "-c", script, code]


def test_every_variable_is_parsed_and_defaults_hold():
    defaults = settings.read({})
    assert defaults.check is False and defaults.ranks_per_node is None and defaults.ring_segment == 1 << 20
    given = settings.read({"HPC_TRAIN_RING_SEGMENT": "64k", "HPC_TRAIN_RANKS_PER_NODE": "2", "HPC_TRAIN_CHECK": "1"})
    assert given.ring_segment == 65536 and given.ranks_per_node == 2 and given.check is True
    with pytest.raises(ValueError, match="HPC_TRAIN_SHM_CHUNK='lots': invalid size"):
        settings.read({"HPC_TRAIN_SHM_CHUNK": "lots"})


def test_ranks_take_rank_zeros_settings_and_say_so():
    proc = run_mpi(2, on_rank_one("HPC_TRAIN_CHECK=1 HPC_TRAIN_RING_SEGMENT=4k HPC_TRAIN_RANKS_PER_NODE=1", SHOW),
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str([["False", "1048576", "None", "1"]] * 2)
    assert "HPC_TRAIN_CHECK: this rank's environment gives True, rank 0's False; using rank 0's" in proc.stderr
    assert "HPC_TRAIN_RANKS_PER_NODE: this rank's environment gives 1, rank 0's None" in proc.stderr


def test_a_bad_value_on_one_rank_fails_every_rank_naming_it():
    start = time.monotonic()
    proc = run_mpi(2, on_rank_one("HPC_TRAIN_RANKS_PER_NODE=0", SHOW), timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("rank 1: HPC_TRAIN_RANKS_PER_NODE='0': expected a positive integer") == 2
    assert time.monotonic() - start < 30

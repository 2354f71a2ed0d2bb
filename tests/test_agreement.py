"""Ranks launched with different environments and tuning files still choose alike (serial tests
that launch mpirun with a separate environment per rank: `mpirun -n 1 -x A=1 p : -n 1 -x A=2 p`).

The witness is each rank's own report of the algorithm it chose per size, and allreduce results
checked against the exact sum; a disagreement must end in the same error on every rank, not a hang.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .conftest import python_cmd, run_mpi

SIZES = [1 << 10, 1 << 16, 1 << 20, 1 << 22]
PROGRAM = f"""
import json, sys
import numpy as np
import hpc_train as ht
from hpc_train import runtime
from hpc_train.comm import auto
ht.init()
if sys.argv[1] == "diverge" and ht.rank() == 1:  # as if rank 1 had read other tables after all
    auto._agreed = {{key: [[None, "ring"]] for key in auto._agreed}}
    auto.forget_choices()
chosen = [auto.choose(n, runtime.topology()) for n in {SIZES}]
for n in {SIZES}:
    total = ht.allreduce(np.full(n // 4, ht.rank() + 1, np.float32), check=True)
    assert (total == 3).all()
print(json.dumps({{"rank": ht.rank(), "chosen": chosen}}), flush=True)
"""


def tables(algorithm: str) -> dict:
    """Every key a 2-rank run on this machine can use, all on one algorithm."""
    keys = ["1x2", "1x2-oversubscribed", "single-node", "single-node-oversubscribed"]
    return {"version": 1, "tables": {key: [[None, algorithm]] for key in keys}}


def home_with(tmp_path: Path, name: str, content: str) -> Path:
    home = tmp_path / name
    (home / ".config" / "hpc_train").mkdir(parents=True)
    (home / ".config" / "hpc_train" / "allreduce_tuning.json").write_text(content)
    return home


def two_ranks(tmp_path: Path, mode: str, env0: dict, env1: dict):
    """One rank with env0, one with env1 (Open MPI's per-context -x), running PROGRAM."""
    program = tmp_path / "agree.py"
    program.write_text(PROGRAM)

    def context(env):
        return ["-n", "1", *(x for k, v in env.items() for x in ("-x", f"{k}={v}")),
                *python_cmd(str(program), mode)]

    return run_mpi(1, [*context(env0)[2:], ":", *context(env1)], timeout=120)


def reports(proc) -> dict[int, list[str]]:
    """Each rank's report wherever it lies: mpirun forwards each rank's output as it comes, so one
    rank's report can land before the other's newline, on the same line."""
    decoder = json.JSONDecoder()
    found = [decoder.raw_decode(proc.stdout, at.start())[0] for at in re.finditer(r'\{"rank"', proc.stdout)]
    return {r["rank"]: r["chosen"] for r in found}


def test_ranks_with_different_tuning_files_take_rank_0s(tmp_path):
    tuning = tmp_path / "rank1-tuning.json"
    tuning.write_text(json.dumps(tables("shm")))
    proc = two_ranks(tmp_path, "agree", {"HOME": home_with(tmp_path, "home0", json.dumps(tables("mpi")))},
                     {"HOME": home_with(tmp_path, "home1", json.dumps(tables("ring"))),
                      "HPC_TRAIN_TUNING": tuning})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert reports(proc) == {0: ["mpi"] * len(SIZES), 1: ["mpi"] * len(SIZES)}
    assert "differ from rank 0's; using rank 0's" in proc.stderr  # rank 1 is told, once
    assert "HPC_TRAIN_TUNING: this rank's environment gives" in proc.stderr


def test_a_bad_tuning_file_on_rank_0_is_an_error_on_every_rank(tmp_path):
    proc = two_ranks(tmp_path, "agree", {"HOME": home_with(tmp_path, "home0", "{not json")},
                     {"HOME": home_with(tmp_path, "home1", json.dumps(tables("ring")))})
    assert proc.returncode != 0
    rank0_file = tmp_path / "home0" / ".config" / "hpc_train" / "allreduce_tuning.json"
    error = f"ValueError: allreduce tuning table of rank 0: {rank0_file}:1: "
    assert proc.stderr.count(error) == 2, proc.stderr[-3000:]  # on both ranks, naming rank 0's file and line


def test_ranks_that_would_run_different_algorithms_fail_the_check_instead_of_hanging(tmp_path):
    home = home_with(tmp_path, "home", json.dumps(tables("mpi")))
    proc = two_ranks(tmp_path, "diverge", {"HOME": home}, {"HOME": home})
    assert proc.returncode != 0 and not reports(proc)
    assert "ranks disagree on the call" in proc.stderr, proc.stderr[-3000:]
    assert "chosen=mpi" in proc.stderr and "chosen=ring" in proc.stderr

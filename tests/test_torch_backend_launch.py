"""`init_process_group(backend="hpc")` exactly as a user's script calls it, launched by mpirun (serial tests).

No MASTER_ADDR, no store, no rank given: rank and world size must come from MPI, and a backend that
needs a real rendezvous must say what to set instead of waiting.
"""

from __future__ import annotations

import re
import time

import pytest

pytest.importorskip("torch")

from .conftest import python_cmd, run_mpi  # noqa: E402

SCRIPT = """
import os
import torch
import torch.distributed as dist
import hpc_train.torch  # registers the backend

assert "MASTER_ADDR" not in os.environ
dist.init_process_group(backend={backend!r})
r, n = dist.get_rank(), dist.get_world_size()
t = torch.full((2,), float(r + 1))
dist.all_reduce(t)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
model(torch.ones(2, 3)).sum().backward()
print(f"rank {{r}} of {{n}} on {{dist.get_backend()}}: sum {{t.tolist()}}", flush=True)
dist.destroy_process_group()
"""


def launch(tmp_path, ranks: int, backend: str, env: dict | None = None):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT.format(backend=backend))
    return run_mpi(ranks, python_cmd(str(script)), timeout=120, env=env)


def test_init_process_group_takes_rank_and_size_from_mpi(tmp_path):
    proc = launch(tmp_path, 3, "hpc")
    assert proc.returncode == 0, proc.stderr
    lines = sorted(re.findall(r"rank \d+ of \d+ on \w+: sum \[[^]]*\]", proc.stdout))  # ranks' lines may interleave
    assert lines == [f"rank {r} of 3 on hpc: sum [6.0, 6.0]" for r in range(3)], proc.stdout


def test_other_backends_keep_torchs_own_rendezvous(tmp_path):
    proc = launch(tmp_path, 2, "gloo")
    assert proc.returncode != 0
    assert "using env:// rendezvous: environment variable RANK expected" in proc.stderr, proc.stderr


def test_a_rank_given_that_differs_from_mpis_is_refused(tmp_path):
    proc = launch(tmp_path, 2, "hpc", env={"RANK": "5"})
    assert proc.returncode != 0
    assert proc.stderr.count("rank 5 was given") == 2 and "MPI launched this process as rank 0" in proc.stderr


def test_a_gloo_group_beside_hpc_without_a_shared_store_fails_at_once(tmp_path):
    script = tmp_path / "mixed.py"
    script.write_text("import torch.distributed as dist\nimport hpc_train.torch\n"
                      "dist.init_process_group(backend='hpc')\ndist.new_group(backend='gloo')\n")
    started = time.perf_counter()
    proc = run_mpi(2, python_cmd(str(script)), timeout=120)
    assert proc.returncode != 0 and time.perf_counter() - started < 60  # not gloo's 30-minute wait for peers

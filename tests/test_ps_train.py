"""The parameter-server modes through `hpc-train train` (serial tests launching mpirun)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from .conftest import KILLED_RANK, ROOT, clean_environment, python_cmd, rank_pids, run_mpi
from .test_ps import check_ssp_bound


def train(ranks, *sets, metrics, job="jobs/demo.toml", timeout=300):
    args = python_cmd("-m", "hpc_train.cli", "train", job, "--metrics", str(metrics), "--set", "log.progress=false")
    for s in sets:
        args += ["--set", s]
    return run_mpi(ranks, args, timeout=timeout)


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_the_demo_cnn_learns_through_the_parameter_server(tmp_path, mode):
    metrics = tmp_path / "m.jsonl"
    timeline = tmp_path / "trace.json"
    proc = train(2, f"ps.mode={mode}", "ps.staleness=2", "optimizer.lr=0.01", f"log.timeline={timeline}",
                 metrics=metrics)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    summary = records[-1]
    assert summary["ps_mode"] == mode and summary["val_accuracy"] >= 0.85, summary
    steps = [r for r in records if r["type"] == "step"]
    assert all({"mean", "max", "histogram"} <= set(r["staleness"]) for r in steps)
    pushes = [(int(m[1]), event["pid"], int(m[2])) for event in json.loads(timeline.read_text())["traceEvents"]
              if (m := re.match(r"push #(\d+) at clock (\d+)", event["name"]))]
    assert len(pushes) == 2 * summary["steps"]  # every push of both workers, each once
    if mode == "ssp":  # the witness: the store's own push order, read from both ranks' timelines
        assert check_ssp_bound(pushes, 2, 2) <= 2
        assert summary["staleness"]["max"] <= 2


def test_a_worker_that_dies_ends_the_job(tmp_path):
    metrics = tmp_path / "m.jsonl"
    command = ["mpirun", "-n", "2", *python_cmd("-m", "hpc_train.cli", "train", "jobs/demo.toml", "--metrics",
                                                str(metrics), "--set", "ps.mode=ssp", "--set", "ps.staleness=0",
                                                "--set", "train.epochs=50", "--set", "log.progress=false")]
    proc = subprocess.Popen(command, env=clean_environment(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not metrics.exists() or metrics.stat().st_size == 0):
            time.sleep(0.1)  # training under way
        ranks = rank_pids(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)  # one worker dies; the other waits on its clock (s = 0)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0 and KILLED_RANK.search(proc.stdout.read()), "the job did not end with its worker"

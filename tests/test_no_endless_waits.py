"""The C flag waits of the shared-memory allreduce (flagshm.c) never spin forever (serial tests
that launch mpirun): a peer that never arrives becomes an error naming it, Ctrl-C reaches a rank
that waits, and a waiting rank sleeps instead of taking its core. Plain library programs: no
trainer, no stall watchdog."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from .conftest import clean_environment, python_cmd

PROGRAM = """
import os, sys, time, numpy as np, hpc_train as ht
ht.init()
folder, size, sleeper = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = np.ones(size, np.float32)
ht.allreduce(x, algorithm="shm")  # the node window exists: what follows waits in C, not in MPI
if ht.rank() == sleeper:
    time.sleep(300)  # never arrives
open(f"{folder}/{ht.rank()}.pid", "w").write(str(os.getpid()))
for _ in range(10**8):
    ht.allreduce(x, algorithm="shm")
"""


def launch(tmp_path, size: int, sleeper: int, timeout_s: float) -> subprocess.Popen:
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    return subprocess.Popen(["mpirun", "-n", "3", *python_cmd(str(program), str(tmp_path), str(size), str(sleeper))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**clean_environment(), "HPC_TRAIN_SHM_TIMEOUT_S": str(timeout_s)})


def pid_of(tmp_path, rank: int, proc, deadline: float) -> int:
    path = tmp_path / f"{rank}.pid"
    while not (path.exists() and path.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    return int(path.read_text())


def finish(proc, timeout: float):
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("size", [1000, 1_000_000], ids=["small-path", "pipeline"])
def test_a_stopped_peer_becomes_an_error_naming_it_within_the_timeout(tmp_path, size):
    proc = launch(tmp_path, size, sleeper=-1, timeout_s=3)
    deadline = time.monotonic() + 120
    hung = pid_of(tmp_path, 1, proc, deadline)
    for rank in (0, 2):
        pid_of(tmp_path, rank, proc, deadline)
    time.sleep(0.2)  # all three in the loop
    os.kill(hung, signal.SIGSTOP)  # a hung peer (a killed one would make mpirun end the job at once)
    stopped = time.monotonic()
    _, err = finish(proc, timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - stopped < 30  # the 3 s limit, then the job's abort; not a spin forever
    named = "SharedMemoryTimeout: shared-memory allreduce on"
    assert err.count(named) >= 1 and "world rank(s) [1] did not arrive within 3 s" in err, err[-3000:]


def test_ctrl_c_reaches_a_rank_waiting_for_its_peers(tmp_path):
    proc = launch(tmp_path, 1000, sleeper=1, timeout_s=600)
    deadline = time.monotonic() + 120
    waiting = pid_of(tmp_path, 0, proc, deadline)
    time.sleep(0.5)  # rank 0 is in the C wait for rank 1, which sleeps
    os.kill(waiting, signal.SIGINT)
    interrupted = time.monotonic()
    _, err = finish(proc, timeout=60)
    assert proc.returncode != 0 and time.monotonic() - interrupted < 30
    assert "uncaught exception on rank 0" in err and "KeyboardInterrupt" in err, err[-3000:]


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time, as the kernel counts it."""
    from pathlib import Path

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("size", [1000, 1_000_000], ids=["small-path", "pipeline"])
def test_a_rank_waiting_for_a_late_peer_sleeps_instead_of_spinning(tmp_path, size):
    """A rank shares its core with its own compute (backward beside the engine thread) or, when
    oversubscribed, with the peer it waits for: after a short spin it must sleep, not take the core."""
    proc = launch(tmp_path, size, sleeper=1, timeout_s=600)
    try:
        waiting = pid_of(tmp_path, 0, proc, time.monotonic() + 120)
        time.sleep(0.5)  # rank 0 is in the C wait for rank 1, which sleeps
        before, start = cpu_seconds(waiting), time.monotonic()
        time.sleep(2)
        used, elapsed = cpu_seconds(waiting) - before, time.monotonic() - start
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert used < 0.2 * elapsed, f"rank 0 used {used:.2f} s of CPU in {elapsed:.2f} s of waiting"

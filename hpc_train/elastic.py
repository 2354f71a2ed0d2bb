"""Elastic restart: a supervisor that reruns a training job on the hosts that still answer.

`hpc-train train --elastic JOB [options]`, run plainly (not under mpirun): the supervisor
starts the job through the site's launcher and only restarts it; it launches nothing itself.
Outside Slurm that is mpirun with a hostfile (`--hostfile`, else Open MPI's
`OMPI_MCA_orte_default_hostfile`, else this host with as many slots as CPUs); inside an
allocation it is `srun` over the allocation's nodes (submit with `--no-kill`, or losing a node
ends the allocation: `slurm/elastic.sbatch` does).

When the job fails (any exit code but 0, 2, a bad job file, and 75, preempted), the supervisor
probes every host with a TCP connection across the link (a refused connection proves the host
answers; silence for `probe_timeout_s` means it is gone), keeps the hosts that answer, and
relaunches the job there from the newest complete checkpoint (`checkpoint.resume = "auto"`)
with the largest rank count their slots hold that divides the global batch: the global batch
stays the same, each rank's share grows, and the checkpoint's sample position continues the
epoch with the same samples. It gives up after `max_restarts` restarts, below `min_ranks`, or
when an attempt neither logged a step nor wrote a checkpoint (a failure that would only repeat). Each restart
is logged and written to the metrics file as a "restart" record (why, the hosts kept and lost,
the checkpoint, the steps lost); the resumed run marks the steps it redoes.

This is restart from a checkpoint, not the in-place membership change of Horovod elastic or
torchrun's agent: survivors do not keep their state, the job starts again at the new size.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint, launchers, preemption
from .train.metrics import last_step

log = logging.getLogger("hpc_train")
BAD_JOB = 2  # hpc-train train's exit code for a job file that cannot run: rerunning will not help


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def read_hostfile(path: str | Path) -> list[Host]:
    """Open MPI's hostfile format: `name [slots=N] [max_slots=M]`, # comments; ValueError naming the line."""
    hosts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        options = dict(word.split("=", 1) for word in words[1:] if "=" in word)
        try:
            slots = int(options.get("slots", "1"))
        except ValueError:
            raise ValueError(f"{path}:{number}: slots must be a whole number, got {options['slots']!r}") from None
        hosts.append(Host(words[0], slots))
    if not hosts:
        raise ValueError(f"{path}: no hosts")
    return hosts


def slurm_hosts() -> list[Host]:
    """The nodes of this allocation, with the tasks Slurm gives each (SLURM_TASKS_PER_NODE, e.g. "2(x3),1")."""
    names = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], check=True,
                           capture_output=True, text=True, timeout=60).stdout.split()
    counts = []
    for part in os.environ.get("SLURM_TASKS_PER_NODE", "1").split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return [Host(name, slots) for name, slots in zip(names, counts, strict=False)]


def answers(host: str, port: int, timeout_s: float) -> bool:
    """Whether `host` answers across the network: a TCP connection accepted or refused (either
    way its kernel replied); False when nothing comes back within timeout_s."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:  # timed out, unreachable, unknown name
        return False


def ranks_for(slots: int, global_batch: int, min_ranks: int) -> int:
    """The largest rank count that fits the slots and divides the global batch; 0 if below min_ranks."""
    fitting = [n for n in range(slots, 0, -1) if global_batch % n == 0]
    return fitting[0] if fitting and fitting[0] >= min_ranks else 0


class Supervisor:
    def __init__(self, job, train_args: list[str], hosts: list[Host], launcher: str):
        self.job, self.train_args, self.hosts, self.launcher = job, train_args, hosts, launcher
        self.settings = job.elastic
        self.metrics = Path(job.log.metrics) if job.log.metrics else None
        self._child: subprocess.Popen | None = None

    def command(self, hosts: list[Host], ranks: int, resume: bool) -> tuple[list[str], Path | None]:
        """The launcher's command line for one attempt, and the hostfile it reads (mpirun)."""
        train = [sys.executable, "-m", "hpc_train.cli", "train", *self.train_args]
        if resume:
            train += ["--set", "checkpoint.resume=auto"]
        if self.launcher == "srun":
            return ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "-n", str(ranks),
                    "--nodelist=" + ",".join(h.name for h in hosts), *train], None
        hostfile = Path(tempfile.mkstemp(prefix="hpc_train-hosts-", suffix=".txt")[1])
        hostfile.write_text("".join(f"{h.name} slots={h.slots}\n" for h in hosts))
        return ["mpirun", "-n", str(ranks), "--hostfile", str(hostfile), *train], hostfile

    def _forward(self, signum, _frame) -> None:
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signum)  # mpirun and srun pass USR1 on to every rank

    def run(self) -> int:
        """Attempts until the job ends (its exit code), or restarts are exhausted (the last failure's)."""
        for number in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(number, self._forward)
        if not self.job.checkpoint.every_steps:
            log.warning("elastic: checkpoint.every_steps = 0: a restart begins the run again from its start "
                        "(or from the checkpoint it resumed from)")
        hosts, resume, restarts = list(self.hosts), bool(self.job.checkpoint.resume), 0
        ranks = self._ranks(hosts)
        if not ranks:
            log.error("elastic: %s", self._too_few(hosts))
            return BAD_JOB
        while True:
            command, hostfile = self.command(hosts, ranks, resume)
            log.warning("elastic: attempt %d: %d ranks on %s", restarts, ranks, ", ".join(h.name for h in hosts))
            before = self._progress()
            self._child = subprocess.Popen(command)
            rc = self._child.wait()
            ended = time.time()
            if hostfile is not None:
                hostfile.unlink(missing_ok=True)
            if rc in (0, BAD_JOB, preemption.EXIT_PREEMPTED):
                return rc
            kept = [h for h in hosts if answers(h.name, self.settings.probe_port, self.settings.probe_timeout_s)]
            lost = [h.name for h in hosts if h not in kept]
            why = f"exit code {rc}" + (f"; hosts lost: {', '.join(lost)}" if lost else "; every host answers")
            ranks = self._ranks(kept)
            refusal = ("no restarts left" if restarts >= self.settings.max_restarts else
                       "the attempt failed before it logged a step or wrote a checkpoint (a failure that would "
                       "repeat)" if self._progress() <= before else
                       self._too_few(kept) if not ranks else None)
            if refusal:
                log.error("elastic: the job failed (%s); not restarting: %s", why, refusal)
                return rc
            restarts, resume, hosts = restarts + 1, True, kept
            self._record_restart(restarts, why, lost, hosts, ranks, ended)

    def _ranks(self, hosts: list[Host]) -> int:
        return ranks_for(sum(h.slots for h in hosts), self.job.train.global_batch, self.settings.min_ranks)

    def _too_few(self, hosts: list[Host]) -> str:
        return (f"the {sum(h.slots for h in hosts)} slot(s) of {', '.join(h.name for h in hosts) or 'no host'} hold "
                f"no rank count >= min_ranks = {self.settings.min_ranks} that divides the global batch "
                f"{self.job.train.global_batch}")

    def _progress(self) -> tuple[int, int]:
        """(newest checkpoint's step, last logged step): an attempt that moved neither made no progress."""
        return (checkpoint.newest_step(self.job.checkpoint.directory),
                last_step(self.metrics) if self.metrics else 0)

    def _record_restart(self, restarts: int, why: str, lost: list[str], hosts: list[Host], ranks: int,
                        failed_at: float) -> None:
        """Log the restart, and append it to the metrics file where the job has one."""
        newest = checkpoint.complete_checkpoints(self.job.checkpoint.directory)
        resumed_at, logged = self._progress()
        record = {"type": "restart", "restart": restarts, "reason": why, "lost_hosts": lost,
                  "hosts": [h.name for h in hosts], "ranks": ranks, "checkpoint": str(newest[-1]) if newest else None,
                  "steps_lost": max(0, logged - resumed_at) if self.metrics else None,
                  "failed_at": round(failed_at, 3), "time": round(time.time(), 3)}
        log.warning("elastic: restart %d of %d: %s; %d ranks on %s from %s (%s steps lost)", restarts,
                    self.settings.max_restarts, why, ranks, ", ".join(record["hosts"]),
                    record["checkpoint"] or "the start", record["steps_lost"])
        if self.metrics is not None:
            with self.metrics.open("a") as sink:
                sink.write(json.dumps(record) + "\n")


def launch_plan(hostfile: str | None) -> tuple[list[Host], str]:
    """The hosts and the launcher: the allocation's nodes inside Slurm (srun where it offers PMIx),
    else a hostfile's (mpirun), else this host with a slot per CPU."""
    if hostfile is None and "SLURM_JOB_NODELIST" in os.environ:
        return slurm_hosts(), launchers.preferred()
    path = hostfile or os.environ.get("OMPI_MCA_orte_default_hostfile")  # noqa: SIM112 (MCA spelling)
    if path:
        return read_hostfile(path), "mpirun"
    return [Host("localhost", os.cpu_count() or 1)], "mpirun"

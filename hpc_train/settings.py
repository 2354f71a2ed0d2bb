"""Every HPC_TRAIN_* environment variable, read in this one module.

| variable | effect | default |
|---|---|---|
| `HPC_TRAIN_RANKS_PER_NODE=k` | pretend nodes of k ranks on one host (how tests cross node boundaries) | off |
| `HPC_TRAIN_CHECK=1` | cross-rank check on every direct collective (one small extra allreduce a call) | 0 |
| `HPC_TRAIN_CUDA_AWARE=0\\|1` | override CUDA-aware MPI detection | detected |
| `HPC_TRAIN_TUNING=path` | an auto table that overrides the shipped and user tables | none |
| `HPC_TRAIN_NO_NATIVE=1` | do not build or use the C modules (shared-memory paths, fused optimizer loops) | 0 |
| `HPC_TRAIN_CACHE=dir` | where the C modules are built (`dir/native`) | `~/.cache/hpc_train` |
| `HPC_TRAIN_RING_SEGMENT` | bytes per pipelined segment of the ring | 1M |
| `HPC_TRAIN_SHM_CHUNK` | bytes per chunk of the shared-memory pipeline | 512K |
| `HPC_TRAIN_SHM_SMALL` | largest message of the C flag path | 256K |
| `HPC_TRAIN_SHM_FLAG_CHUNK` | bytes per chunk of the flag path's pipeline | 256K |
| `HPC_TRAIN_SHM_TIMEOUT_S` | a shared-memory allreduce's C waits give up after this long (0: never) | 600 |
| `HPC_TRAIN_LAUNCHER=srun\\|mpirun` | what sbatch scripts, studies, `--elastic` launch with | srun with PMIx |
| `HPC_TRAIN_LOG_LEVEL` | level of the `[rank/size]` logger | WARNING |
| `HPC_TRAIN_PREEMPT_GRACE_S` | seconds from a preemption signal to the kill (set by the sbatch scripts) | unknown |

(`HPC_TRAIN_VENV` and `HPC_TRAIN_RESUBMITTED` belong to the Slurm scripts,
`HPC_TRAIN_NETNS_DIR` to the network-namespace rig; Python never reads them.)

Before `init()`, `current()` reads this process's environment at every call. `init()` makes
rank 0's settings every rank's (`agree`): choices that must match across ranks (checks,
pretended nodes, segment sizes, the tuning table) then never differ, and a rank whose own
environment said otherwise logs which variable it overrides.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from .units import parse_size

log = logging.getLogger("hpc_train")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError("expected a positive integer")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise ValueError("expected a number of seconds, 0 or more")
    return value


def _launcher(text: str) -> str:
    if text not in ("srun", "mpirun"):
        raise ValueError("expected srun or mpirun")
    return text


def _zero_or_one(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError("expected 0 or 1")
    return text == "1"


@dataclass(frozen=True)
class Variable:
    name: str
    parse: Callable[[str], object]
    default: object


VARIABLES = {
    "ranks_per_node": Variable("HPC_TRAIN_RANKS_PER_NODE", _positive_int, None),
    "check": Variable("HPC_TRAIN_CHECK", lambda text: text == "1", False),
    "cuda_aware": Variable("HPC_TRAIN_CUDA_AWARE", _zero_or_one, None),
    "tuning": Variable("HPC_TRAIN_TUNING", str, None),
    "no_native": Variable("HPC_TRAIN_NO_NATIVE", lambda text: text == "1", False),
    "cache": Variable("HPC_TRAIN_CACHE", str, None),
    "ring_segment": Variable("HPC_TRAIN_RING_SEGMENT", parse_size, 1 << 20),
    "shm_chunk": Variable("HPC_TRAIN_SHM_CHUNK", parse_size, 512 << 10),
    "shm_small": Variable("HPC_TRAIN_SHM_SMALL", parse_size, 256 << 10),
    "shm_flag_chunk": Variable("HPC_TRAIN_SHM_FLAG_CHUNK", parse_size, 256 << 10),
    "log_level": Variable("HPC_TRAIN_LOG_LEVEL", str, "WARNING"),
    "launcher": Variable("HPC_TRAIN_LAUNCHER", _launcher, None),
    "preempt_grace_s": Variable("HPC_TRAIN_PREEMPT_GRACE_S", _seconds, None),
    "shm_timeout_s": Variable("HPC_TRAIN_SHM_TIMEOUT_S", _seconds, 600.0),
}

Settings = dataclasses.make_dataclass("Settings", list(VARIABLES), frozen=True)
Settings.__doc__ = "The value of every variable of VARIABLES, by field name (see the module's table)."


def read(environ=os.environ) -> Settings:
    """The settings this environment gives; ValueError naming the variable and its value when one is bad."""
    values = {}
    for field, variable in VARIABLES.items():
        text = environ.get(variable.name, "").strip()
        try:
            values[field] = variable.parse(text) if text else variable.default
        except ValueError as exc:
            raise ValueError(f"{variable.name}={environ[variable.name]!r}: {exc}") from None
    return Settings(**values)


_agreed: Settings | None = None


def current() -> Settings:
    """The settings in force: rank 0's once `init()` agreed on them, this process's environment before."""
    return _agreed if _agreed is not None else read()


def agree(comm) -> Settings:
    """Every rank takes rank 0's settings (collective); differences are logged where they are overridden.

    A bad value on any rank raises ValueError on every rank, naming the rank, the variable and
    the value, instead of leaving the others waiting."""
    global _agreed
    try:
        mine, problem = dataclasses.asdict(read()), None
    except ValueError as exc:
        mine, problem = None, f"rank {comm.Get_rank()}: {exc}"
    problems = [p for p in comm.allgather(problem) if p]
    if problems:
        raise ValueError("; ".join(problems))
    chosen = comm.bcast(mine, root=0)
    for field, value in chosen.items():
        if value != mine[field]:
            log.warning("%s: this rank's environment gives %r, rank 0's %r; using rank 0's",
                        VARIABLES[field].name, mine[field], value)
    _agreed = Settings(**chosen)
    return _agreed

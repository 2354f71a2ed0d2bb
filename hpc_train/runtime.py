"""MPI start-up shared by every rank.

`init()` creates the world, node-local and cross-node communicators, installs the
abort-on-exception hooks (one failing rank ends the job instead of leaving the
others blocked until walltime) and prefixes log records with time, host and `[rank/size]`.
MPI itself is imported lazily so that `env_local_rank()` can be read, and a GPU
bound, before `MPI_Init` runs.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from . import settings

log = logging.getLogger("hpc_train")

# Variables through which launchers announce a process's rank on its node.
LOCAL_RANK_VARIABLES = (
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "PMI_LOCAL_RANK",
    "SLURM_LOCALID",
)


@dataclass(frozen=True)
class Topology:
    """Where a communicator's ranks sit: node-local and cross-node sub-communicators.

    `node` holds the ranks of one shared-memory node (or of one pretended node, see
    HPC_TRAIN_RANKS_PER_NODE); `cross` holds the ranks with the same local rank on
    every node; `leaders` holds local rank 0 of every node (COMM_NULL elsewhere).
    """

    comm: object
    node: object
    cross: object
    leaders: object
    node_index: int
    num_nodes: int
    node_sizes: tuple[int, ...]
    pretended: bool
    host_ranks: int  # ranks sharing this rank's physical host (pretended nodes or not)
    oversubscribed: bool  # some host of the communicator runs more ranks than it has cores (agreed)

    @property
    def uniform(self) -> bool:
        """True when every node holds the same number of ranks."""
        return len(set(self.node_sizes)) == 1


def env_local_rank() -> int | None:
    """The node-local rank the launcher announced, readable before MPI_Init."""
    for name in LOCAL_RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return None


def pretended_ranks_per_node() -> int | None:
    """HPC_TRAIN_RANKS_PER_NODE as an int, or None; a bad value is named."""
    return settings.current().ranks_per_node


def build_topology(comm) -> Topology:
    """Split `comm` into node and cross-node communicators (collective over `comm`)."""
    from mpi4py import MPI

    shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    host_ranks = shared.Get_size()
    per_node = pretended_ranks_per_node()
    if per_node is not None:
        node = shared.Split(color=shared.Get_rank() // per_node, key=comm.Get_rank())
        shared.Free()
    else:
        node = shared
    local_rank = node.Get_rank()
    leaders = comm.Split(color=0 if local_rank == 0 else MPI.UNDEFINED, key=comm.Get_rank())
    node_index = leaders.Get_rank() if local_rank == 0 else 0
    node_index = node.bcast(node_index, root=0)
    cross = comm.Split(color=local_rank, key=node_index)
    node_sizes = tuple(comm.allgather((node_index, node.Get_size())))
    sizes = tuple(size for _, size in sorted(set(node_sizes)))
    oversubscribed = comm.allreduce(host_ranks > (os.cpu_count() or 1), op=MPI.LOR)
    return Topology(
        comm=comm,
        node=node,
        cross=cross,
        leaders=leaders,
        node_index=node_index,
        num_nodes=len(sizes),
        node_sizes=sizes,
        pretended=per_node is not None,
        host_ranks=host_ranks,
        oversubscribed=oversubscribed,
    )


class _Runtime:
    def __init__(self, world):
        self.world = world
        self.topology = build_topology(world)
        self.hostnames = world.allgather(socket.gethostname())  # to name where a silent rank runs


_runtime: _Runtime | None = None
_init_lock = threading.Lock()
_at_init: list = []


def at_init(agree) -> None:
    """Have `agree(world)` run on every rank inside init(), after the settings are agreed.

    For choices every rank must make alike but that belong to a layer above this one (the
    allreduce tuning table: files in each rank's home): made there, collectively, at a point
    every rank passes in the same order."""
    _at_init.append(agree)


def init(abort_on_exception: bool = True, log_level: int | str | None = None) -> _Runtime:
    """Initialize MPI and hpc_train's communicators; idempotent.

    Call once near the top of an SPMD program (every rank). Later calls return
    the same runtime.
    """
    global _runtime
    with _init_lock:
        if _runtime is not None:
            return _runtime
        from mpi4py import MPI

        settings.agree(MPI.COMM_WORLD)  # before anything that must match across ranks is decided
        _runtime = _Runtime(MPI.COMM_WORLD)
        setup_logging(log_level)
        for agree in _at_init:
            agree(MPI.COMM_WORLD)
        if abort_on_exception:
            install_abort_hooks()
        return _runtime


def initialized() -> bool:
    return _runtime is not None


def runtime() -> _Runtime:
    return init() if _runtime is None else _runtime


def world():
    """MPI.COMM_WORLD, after init()."""
    return runtime().world


def topology() -> Topology:
    return runtime().topology


def hostnames() -> list[str]:
    """The host every rank of the world runs on, by rank."""
    return runtime().hostnames


def rank() -> int:
    return runtime().world.Get_rank()


def size() -> int:
    return runtime().world.Get_size()


def local_rank() -> int:
    """Rank on this node; before init() it comes from the launcher's environment."""
    if _runtime is None:
        announced = env_local_rank()
        if announced is not None:
            return announced
    return topology().node.Get_rank()


def local_size() -> int:
    return topology().node.Get_size()


def node_index() -> int:
    return topology().node_index


def num_nodes() -> int:
    return topology().num_nodes


class RankFormatter(logging.Formatter):
    """Prefix every record with its time, host and `[rank/size]`: interleaved output from many
    nodes stays readable, and a hang can be placed in time and on a machine."""

    host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            where = f"[{MPI.COMM_WORLD.Get_rank()}/{MPI.COMM_WORLD.Get_size()}]"
        else:
            where = "[-/-]"
        when = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        return f"{when} {self.host} {where} {super().format(record)}"


def setup_logging(level: int | str | None = None) -> None:
    """Attach a time-, host- and rank-prefixed stderr handler to the `hpc_train` logger once."""
    if not any(isinstance(h.formatter, RankFormatter) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(RankFormatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    level = level or settings.current().log_level
    log.setLevel(level.upper() if isinstance(level, str) else level)


def abort(message: str, grace_s: float = 5.0) -> None:
    """Log, then end the whole job: MPI_Abort, and _exit after grace_s should the abort itself
    hang (it tries to reach every node, and one may be cut off). The one way a job is ended."""
    from mpi4py import MPI

    log.critical(message)
    for handler in log.handlers:
        handler.flush()
    sys.stderr.flush()
    timer = threading.Timer(grace_s, os._exit, args=(1,))
    timer.daemon = True
    timer.start()
    MPI.COMM_WORLD.Abort(1)


def abort_job(exc_type, exc, tb, where: str = "") -> None:
    """Log the traceback with the rank, then abort the whole job."""
    from mpi4py import MPI

    text = "".join(traceback.format_exception(exc_type, exc, tb))
    rank_ = MPI.COMM_WORLD.Get_rank() if MPI.Is_initialized() else -1
    abort(f"uncaught exception{where} on rank {rank_}, aborting the job:\n{text}")


def install_abort_hooks() -> None:
    """Make an uncaught exception on any rank, in any thread, end the job."""

    def excepthook(exc_type, exc, tb):
        abort_job(exc_type, exc, tb)

    def thread_excepthook(args):
        if args.exc_type is SystemExit:
            return
        abort_job(args.exc_type, args.exc_value, args.exc_traceback, f" in thread {args.thread.name}")

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook

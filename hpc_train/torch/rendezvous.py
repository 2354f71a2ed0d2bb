"""`init_process_group(backend="hpc")` with no rendezvous: rank and world size come from MPI.

Without an `init_method` or a `store`, torch rendezvouses through "env://", which wants
MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE and opens a TCP store: variables that batch
systems do not set, for a store our backend never uses. `install()` wraps
`torch.distributed.init_process_group` so that for backend "hpc" alone, given neither, rank and
world size are MPI's and the default group gets a store local to each rank. Every other call,
gloo's and nccl's included, reaches torch unchanged. (A script that imported
`init_process_group` by name before importing hpc_train.torch holds torch's own function.)
"""

from __future__ import annotations

import functools
import inspect
import os

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


class LocalStore(dist.Store):
    """A key-value store of this rank alone: what the default group is given, and never needs. A gloo
    or nccl group made from it later fails at once rather than waiting for peers that never write."""

    def __init__(self):
        super().__init__()
        self._values: dict[str, bytes] = {}

    @staticmethod
    def _missing(key: str):
        return RuntimeError(
            f"torch.distributed store key {key!r}: this job's store is local to each rank (rank and size came "
            "from MPI, for hpc_train's backend 'hpc', which needs no store); a gloo or nccl group in the same job "
            "needs a shared one: init_process_group(backend='hpc', init_method=...) or store=...")

    def set(self, key, value):
        self._values[key] = value if isinstance(value, bytes) else str(value).encode()

    def get(self, key):
        if key not in self._values:
            raise self._missing(key)
        return self._values[key]

    def add(self, key, amount):
        value = int(self._values.get(key, b"0")) + amount
        self._values[key] = str(value).encode()
        return value

    def check(self, keys):
        return all(k in self._values for k in keys)

    def wait(self, keys, timeout=None):
        for key in keys:
            if key not in self._values:
                raise self._missing(key)

    def delete_key(self, key):
        return self._values.pop(key, None) is not None

    def num_keys(self):
        return len(self._values)


def launched_by_mpi(asked_rank: int, asked_size: int) -> tuple[int, int]:
    """(rank, world size) from MPI; what the caller gave, or RANK / WORLD_SIZE, must agree with it."""
    from .. import runtime

    world = runtime.init().world
    launched = {"rank": world.Get_rank(), "world_size": world.Get_size()}
    given = {"rank": (asked_rank, "RANK"), "world_size": (asked_size, "WORLD_SIZE")}
    for key, value in launched.items():
        asked, variable = given[key]
        for source, number in ((f"init_process_group({key}=...)", asked), (variable, os.environ.get(variable))):
            if number not in (None, -1) and int(number) != value:
                raise ValueError(f"init_process_group(backend='hpc'): {key} {number} was given ({source}), but MPI "
                                 f"launched this process as {key} {value}")
    return launched["rank"], launched["world_size"]


def install() -> None:
    """Wrap torch.distributed.init_process_group as the module's doc says (idempotent)."""
    torch_init = c10d.init_process_group
    if hasattr(torch_init, "torch_init_process_group"):
        return
    signature = inspect.signature(torch_init)

    @functools.wraps(torch_init)
    def init_process_group(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        given = call.arguments
        if str(given.get("backend", "")).lower() == "hpc" and given.get("init_method") is None \
                and given.get("store") is None:
            rank, size = launched_by_mpi(given.get("rank", -1), given.get("world_size", -1))
            call.arguments.update(store=LocalStore(), rank=rank, world_size=size)
        return torch_init(*call.args, **call.kwargs)

    init_process_group.torch_init_process_group = torch_init
    c10d.init_process_group = dist.init_process_group = init_process_group

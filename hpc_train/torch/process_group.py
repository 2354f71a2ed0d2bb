"""The `torch.distributed` backend "hpc": unchanged DDP and FSDP scripts over MPI and our collectives.

    import hpc_train.torch                                   # registers the backend
    torch.distributed.init_process_group(backend="hpc")      # under mpirun or srun

Rank and world size come from MPI (see `rendezvous.py`: no MASTER_ADDR, no store); a group
from `new_group(ranks)` is an MPI communicator of those ranks. Every collective is queued on
hpc_train's background engine thread, so collectives run one at a time in the order torch
issues them, which torch keeps the same on every rank; each is first checked across the
group (CollectiveMismatchError on every rank instead of a hang), then run: allreduce,
reduce-scatter, allgather and broadcast with our algorithms (`auto`: shared memory inside a
node, rings across nodes), the rest with MPI's own calls. A Work's future is completed on the
engine thread, which is where DDP chains its bucket callbacks. Point-to-point `send`/`recv`
are MPI's non-blocking calls on a communicator of their own, waited for by `Work.wait()`.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.distributed as dist

from .. import comm as collectives
from ..comm.check import CollectiveMismatchError, describe, raise_if_any, verify_same
from .tensors import as_array, as_tensor

BACKEND = "hpc"
_OPS = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.AVG: "mean", dist.ReduceOp.PRODUCT: "prod",
        dist.ReduceOp.MIN: "min", dist.ReduceOp.MAX: "max"}


def reduce_op(opts) -> str:
    """Our op for a torch ReduceOp; NotImplementedError naming the ones we do not offer."""
    for torch_op, ours in _OPS.items():
        if opts.reduceOp == torch_op:
            return ours
    raise NotImplementedError(f"torch.distributed backend {BACKEND!r}: reduce op {opts.reduceOp.op.name} is not "
                              f"offered (SUM, AVG, PRODUCT, MIN, MAX are)")


def flat(tensor: torch.Tensor):
    """The tensor's elements as a 1-D array (its own memory where it is contiguous)."""
    return as_array(tensor.detach().contiguous().reshape(-1))


def concatenated_bytes(tensors) -> torch.Tensor:
    """The tensors' bytes one after another (a copy): what one MPI call sends to the ranks in turn."""
    return torch.cat([t.detach().reshape(-1).view(torch.uint8) for t in tensors])


def holds_every_share(what: str, pairs, size: int) -> None:
    """Each (whole, share) pair: the whole tensor holds `size` shares, one a rank; ValueError if not."""
    for whole, share in pairs:
        if whole.numel() != share.numel() * size:
            raise ValueError(f"{what} has {whole.numel()} elements, {size} ranks x {share.numel()} needed")


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's memory as bytes (any dtype travels through MPI this way)."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


class Work(dist._Work):
    """An operation under way. Collectives: an engine handle, whose future the engine thread
    completes with the output tensors. Point-to-point: an MPI request, completed by `wait()`."""

    def __init__(self, outputs, handle=None, request=None):
        super().__init__()
        self._outputs, self._handle, self._request = outputs, handle, request
        self._future = torch.futures.Future()

    def complete(self, error: BaseException | None = None) -> None:
        """Settle the future (the engine thread, or the waiter of a point-to-point request)."""
        if error is None:
            self._future.set_result(self._outputs)
        else:
            self._future.set_exception(error)

    def wait(self, timeout=None) -> bool:
        if self._handle is not None:
            self._handle.wait()  # raises the collective's error, CollectiveMismatchError included
        elif not self._future.done():
            self._request.Wait()
            self.complete()
        return True

    def is_completed(self) -> bool:
        return self._future.done() or (self._request is not None and self._request.Test() and self.wait())

    def get_future(self) -> torch.futures.Future:
        return self._future


class ProcessGroup(dist.ProcessGroup):
    """An MPI communicator of the group's ranks, driven through our engine (see the module's doc)."""

    def __init__(self, rank: int, size: int, global_ranks: list[int]):
        super().__init__(rank, size)
        self._group_name = self._group_desc = ""
        engine = collectives.engine()
        self._engine = engine
        ranks = list(global_ranks) or list(range(engine.comm.Get_size()))

        def create(world):  # on the engine thread, in this rank's order of group creation
            group = world if ranks == list(range(world.Get_size())) else world.Create_group(
                world.Get_group().Incl(ranks), zlib.crc32(repr(ranks).encode()) & 0x7FFF)
            return group, group.Dup()

        self._comm, self._p2p = engine.submit(create, f"torch.distributed group {ranks}").wait()
        if self._comm.Get_rank() != rank:
            raise RuntimeError(f"torch.distributed group {ranks}: torch places this rank at {rank}, MPI at "
                               f"{self._comm.Get_rank()}")

    def getBackendName(self) -> str:
        return BACKEND

    # torch names every group once made (DeviceMesh, FSDP2 look groups up by name); the base class
    # would keep the name in registered C++ backends, which a Python group does not have
    def setGroupName(self, name: str) -> None:
        self._group_name = name

    def getGroupName(self) -> str:
        return self._group_name

    def setGroupDesc(self, description: str) -> None:
        self._group_desc = description

    def getGroupDesc(self) -> str:
        return self._group_desc

    # -- how every collective runs ------------------------------------------------------------------

    def _submit(self, what: str, run, outputs) -> Work:
        """Queue run(communicator) on the engine; the Work completes when it has."""
        work = Work(outputs)

        def job(_engine_comm):
            try:
                run(self._comm)
            except BaseException as error:
                work.complete(error)
                raise
            work.complete()

        work._handle = self._engine.submit(job, f"torch.distributed {what}")
        return work

    def _pairwise(self, what: str, outputs, inputs, collective) -> Work:
        """collective(input, out=output, communicator) for each pair, as flat arrays, on the engine."""
        def run(communicator):
            for output, tensor in zip(outputs, inputs, strict=True):
                with staged(output) as out:
                    collective(flat(tensor), out.reshape(-1), communicator)
        return self._submit(what, run, outputs)

    def _check(self, communicator, what: str, **fields) -> None:
        verify_same(communicator, f"torch.distributed {what}", describe(**fields))

    # -- our collectives --------------------------------------------------------------------------

    def allreduce(self, tensors, opts):
        op = reduce_op(opts)

        def run(communicator):
            for tensor in tensors:
                with staged(tensor) as array:
                    collectives.allreduce(array, op, out=array, comm=communicator, check=True,
                                          name="torch.distributed allreduce")
        return self._submit("allreduce", run, tensors)

    def allreduce_coalesced(self, tensors, opts):
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors, opts):
        def run(communicator):
            for tensor in tensors:
                with staged(tensor) as array:
                    collectives.broadcast(array, opts.rootRank, comm=communicator, check=True,
                                          name="torch.distributed broadcast")
        return self._submit("broadcast", run, tensors)

    def allgather(self, output_lists, inputs, opts):
        def run(communicator):
            for outputs, tensor in zip(output_lists, inputs, strict=True):
                gathered = collectives.allgather(flat(tensor), comm=communicator, check=True,
                                                 name="torch.distributed allgather")
                for output, piece in zip(outputs, np.split(gathered, len(outputs)), strict=True):
                    output.copy_(as_tensor(piece).reshape(output.shape))
        return self._submit("allgather", run, output_lists)

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts):
        """all_gather_into_tensor of each (output, input) pair: every rank's input, in rank order."""
        holds_every_share("all_gather_into_tensor: the output", zip(outputs, inputs, strict=True), self.size())

        return self._pairwise("all_gather_into_tensor", outputs, inputs, lambda x, out, communicator: (
            collectives.allgather(x, out=out, comm=communicator, check=True,
                                  name="torch.distributed all_gather_into_tensor")))

    def _allgather_base(self, output, tensor, opts):
        return self.allgather_into_tensor_coalesced([output], [tensor], opts)

    all_gather_single = _allgather_base
    allgather_coalesced = allgather

    def reduce_scatter(self, outputs, input_lists, opts):
        op = reduce_op(opts)

        def run(communicator):
            for output, inputs in zip(outputs, input_lists, strict=True):
                whole = torch.cat([t.detach().reshape(-1) for t in inputs])
                mine = collectives.reduce_scatter(as_array(whole), op, counts=[t.numel() for t in inputs],
                                                  comm=communicator, check=True,
                                                  name="torch.distributed reduce_scatter")
                output.copy_(as_tensor(mine).reshape(output.shape))
        return self._submit("reduce_scatter", run, outputs)

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts):
        """reduce_scatter_tensor of each (output, input) pair: this rank's equal share of the reduction."""
        holds_every_share("reduce_scatter_tensor: the input", zip(inputs, outputs, strict=True), self.size())
        op = reduce_op(opts)
        return self._pairwise("reduce_scatter_tensor", outputs, inputs, lambda x, out, communicator: (
            collectives.reduce_scatter(x, op, out=out, counts=[out.size] * self.size(), comm=communicator,
                                       check=True, name="torch.distributed reduce_scatter_tensor")))

    def _reduce_scatter_base(self, output, tensor, opts):
        return self.reduce_scatter_tensor_coalesced([output], [tensor], opts)

    reduce_scatter_single = _reduce_scatter_base

    def reduce(self, tensors, opts):
        """The reduction on the root only (our allreduce into a copy; other ranks' tensors untouched)."""
        op = reduce_op(opts)

        def run(communicator):
            for tensor in tensors:
                result = as_array(tensor.detach().contiguous().clone())
                collectives.allreduce(result, op, out=result, comm=communicator, check=True,
                                      name="torch.distributed reduce")
                if communicator.Get_rank() == opts.rootRank:
                    tensor.copy_(as_tensor(result).reshape(tensor.shape))
        return self._submit("reduce", run, tensors)

    # -- MPI's own ----------------------------------------------------------------------------------

    def barrier(self, opts):
        def run(communicator):
            self._check(communicator, "barrier")
            communicator.Barrier()
        return self._submit("barrier", run, [])

    def alltoall_base(self, output, tensor, output_splits, input_splits, opts):
        """all_to_all_single: rows of dimension 0 sent to each rank by `input_splits` (equal if empty),
        received by `output_splits`; checked against what the peers send before anything moves."""
        size = self.size()
        row = tensor[0].numel() * tensor.element_size() if tensor.dim() and tensor.shape[0] else 0
        sends = list(input_splits) or [tensor.shape[0] // size] * size
        receives = list(output_splits) or [output.shape[0] // size] * size

        def run(communicator):
            self._check(communicator, "all_to_all_single", dtype=tensor.dtype, row=tensor.shape[1:])
            incoming = np.empty(size, np.int64)
            communicator.Alltoall(np.array(sends, np.int64), incoming)
            problem = "" if incoming.tolist() == receives else (
                f"torch.distributed all_to_all_single: rank {communicator.Get_rank()} expects rows {receives} "
                f"from ranks 0..{size - 1}, they send {incoming.tolist()}")
            raise_if_any(communicator, problem, CollectiveMismatchError)
            exchange(communicator, tensor, output, [s * row for s in sends], [r * row for r in receives])
        return self._submit("all_to_all_single", run, [output])

    def alltoall(self, outputs, inputs, opts):
        def run(communicator):
            self._check(communicator, "all_to_all", dtype=inputs[0].dtype if inputs else None)
            sends = [t.numel() * t.element_size() for t in inputs]
            receives = [t.numel() * t.element_size() for t in outputs]
            incoming = np.empty(self.size(), np.int64)
            communicator.Alltoall(np.array(sends, np.int64), incoming)
            problem = "" if incoming.tolist() == receives else (
                f"torch.distributed all_to_all: rank {communicator.Get_rank()} expects {receives} bytes from "
                f"ranks 0..{self.size() - 1}, they send {incoming.tolist()}")
            raise_if_any(communicator, problem, CollectiveMismatchError)
            whole_in = concatenated_bytes(inputs)
            whole_out = torch.empty(sum(receives), dtype=torch.uint8)
            exchange(communicator, whole_in, whole_out, sends, receives)
            for output, piece in zip(outputs, whole_out.split(receives), strict=True):
                output.copy_(piece.view(output.dtype).reshape(output.shape))
        return self._submit("all_to_all", run, outputs)

    def gather(self, output_lists, inputs, opts):
        root = opts.rootRank

        def run(communicator):
            for tensor in inputs:
                self._check(communicator, "gather", shape=tuple(tensor.shape), dtype=tensor.dtype, root=root)
                mine = as_bytes(tensor.contiguous())
                received = np.empty(mine.size * self.size(), np.uint8) if self.rank() == root else None
                communicator.Gather(mine, received, root=root)
                if received is not None:
                    for output, piece in zip(output_lists[0], np.split(received, self.size()), strict=True):
                        output.copy_(torch.from_numpy(piece).view(output.dtype).reshape(output.shape))
        return self._submit("gather", run, output_lists)

    def scatter(self, outputs, input_lists, opts):
        root = opts.rootRank

        def run(communicator):
            for output in outputs:
                self._check(communicator, "scatter", shape=tuple(output.shape), dtype=output.dtype, root=root)
                whole = concatenated_bytes(input_lists[0]).numpy() if self.rank() == root else None
                with staged(output) as out:
                    communicator.Scatter(whole, out.reshape(-1).view(np.uint8), root=root)
        return self._submit("scatter", run, outputs)

    # -- point to point -----------------------------------------------------------------------------

    def send(self, tensors, dst: int, tag: int):
        (tensor,) = tensors
        payload = tensor.detach().contiguous()
        return Work([payload], request=self._p2p.Isend(as_bytes(payload), dst, tag))

    def recv(self, tensors, src: int, tag: int):
        (tensor,) = tensors
        if not tensor.is_contiguous():
            raise ValueError("torch.distributed backend 'hpc': recv needs a contiguous tensor")
        return Work(tensors, request=self._p2p.Irecv(as_bytes(tensor), src, tag))

    # -- not offered --------------------------------------------------------------------------------

    def _not_offered(self, operation: str):
        raise NotImplementedError(f"torch.distributed backend {BACKEND!r} does not provide {operation} (see "
                                  "docs/torch-distributed.md for what it does)")

    def recv_anysource(self, tensors, tag):
        self._not_offered("recv from any source (dist.recv without src)")

    def monitored_barrier(self, opts, wait_all_ranks=False):
        self._not_offered("monitored_barrier (our stall watchdog names missing ranks instead)")


class staged:
    """`with staged(tensor) as array`: the tensor's memory as an array where it is contiguous on the
    CPU; otherwise a contiguous copy, written back into the tensor on leaving."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.copy = None if tensor.is_contiguous() else tensor.detach().contiguous()

    def __enter__(self) -> np.ndarray:
        return as_array(self.tensor if self.copy is None else self.copy)

    def __exit__(self, *exc) -> None:
        if self.copy is not None and exc[0] is None:
            with torch.no_grad():
                self.tensor.copy_(self.copy)


def exchange(communicator, send: torch.Tensor, receive: torch.Tensor, send_bytes: list, receive_bytes: list) -> None:
    """MPI_Alltoallv of bytes: send_bytes[q] to rank q, receive_bytes[q] from it, blocks in rank order."""
    from mpi4py import MPI

    offsets = lambda counts: np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()  # noqa: E731
    out = receive.view(-1) if receive.is_contiguous() else torch.empty_like(receive).view(-1)
    communicator.Alltoallv([as_bytes(send.contiguous()), (send_bytes, offsets(send_bytes)), MPI.BYTE],
                           [as_bytes(out), (receive_bytes, offsets(receive_bytes)), MPI.BYTE])
    if out.data_ptr() != receive.data_ptr():
        receive.copy_(out.view(receive.shape))


def create(backend_options, _options=None) -> ProcessGroup:
    """torch's constructor hook (extended API: it names the group's global ranks)."""
    return ProcessGroup(backend_options.group_rank, backend_options.group_size,
                        list(backend_options.global_ranks_in_group))


def register() -> None:
    """Make `init_process_group(backend="hpc")` and `new_group(..., backend="hpc")` ours (idempotent)."""
    if BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(BACKEND, create, extended_api=True, devices=["cpu"])

"""Shared-memory allreduce among the ranks of one node (`MPI.Win.Allocate_shared`).

Every rank maps every other rank's segment of a node-shared window, so a
reduction reads peers' data directly instead of receiving copies through MPI.

Copy-in path (any input): the array is cut into chunks that stream through a
ring of NBUF chunk buffers per rank. Step t publishes the slices of chunk t
that other ranks reduce, reduces this rank's own slice of chunk t-1 (its own
data read straight from the input, the peers' from their buffers) into its
buffer, and copies all slices of chunk t-2 out from their owners; one node
barrier separates steps. Buffers are reused every NBUF chunks and the chunk
counter carries over between calls, so no trailing barrier is needed.

Zero-copy path (the input was allocated with `shared_empty` and is reduced in
place): the copy-in disappears; ranks reduce their slices of each other's arrays
directly. A trailing barrier keeps a rank from overwriting its array while
peers still read it.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import numpy as np

from .. import settings
from ..blocks import partition
from .ops import ReduceOp

log = logging.getLogger("hpc_train.comm")
NBUF = 4


def pipeline_chunk_bytes() -> int:
    """Bytes per chunk of the shared-memory pipeline (HPC_TRAIN_SHM_CHUNK, a multiple of 64)."""
    return settings.current().shm_chunk // 64 * 64


def flag_slot_bytes() -> int:
    """Messages up to this size take the flag-synchronized C path (flagshm.c) when it is built;
    larger ones its chunk pipeline, whose barriers are flags too (HPC_TRAIN_SHM_SMALL)."""
    return settings.current().shm_small // 64 * 64


def flag_chunk_bytes() -> int:
    return settings.current().shm_flag_chunk // 64 * 64

FLAG_OPCODES = {"sum": 0, "prod": 1, "max": 2, "min": 3, "mean": 4}
_FLAG_DTYPES = frozenset(np.dtype(t) for t in (np.float32, np.float64, np.int8, np.uint8, np.int16,
                                                np.uint16, np.int32, np.uint32, np.int64, np.uint64))


class SharedMemoryTimeout(TimeoutError):
    """A peer on this node did not arrive at a shared-memory allreduce within HPC_TRAIN_SHM_TIMEOUT_S
    (hung, stopped, or busy elsewhere), or gave up itself; names the world ranks."""


class SharedSegments:
    """A node-shared window of `nbytes` per rank; `segments[q]` is rank q's bytes, mapped here."""

    def __init__(self, node_comm, nbytes: int):
        from mpi4py import MPI

        self.comm = node_comm
        self.nbytes = nbytes
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")
        self.win = MPI.Win.Allocate_shared(nbytes, 1, info=info, comm=node_comm)
        info.Free()
        self.segments = [
            np.frombuffer(self.win.Shared_query(q)[0], dtype=np.uint8, count=nbytes)
            for q in range(node_comm.Get_size())
        ]
        mine = self.segments[node_comm.Get_rank()]
        mine.fill(0)  # first touch here, not inside a timed collective
        self.address = mine.ctypes.data if nbytes else 0
        node_comm.Barrier()

    def free(self) -> None:
        """Release the window (collective over the node)."""
        self.segments = []
        self.win.Free()


class FlagPath:
    """The C paths of flagshm.c: flag-synchronized, no MPI barrier, no Python per chunk."""

    def __init__(self, node_comm, module, slot_bytes: int | None = None, chunk_bytes: int | None = None):
        slot_bytes = slot_bytes or flag_slot_bytes()
        chunk_bytes = chunk_bytes or flag_chunk_bytes()
        self.slot_bytes = slot_bytes
        self.comm = node_comm
        self.timeout_s = settings.current().shm_timeout_s
        self.shared = SharedSegments(node_comm, module.segment_bytes(slot_bytes, chunk_bytes))
        addresses = [segment.ctypes.data for segment in self.shared.segments]
        self.context = module.context(addresses, node_comm.Get_rank(), slot_bytes, chunk_bytes, self.timeout_s,
                                      threading.main_thread().ident)

    def allreduce(self, send, recv, code: int) -> None:
        """recv = the node's reduction of send, in one call (small) or chunk by chunk; a peer that does
        not arrive in time raises SharedMemoryTimeout (this node's flag path is unusable after it)."""
        try:
            if send.nbytes <= self.slot_bytes:
                self.context.allreduce(send, recv, code)
            else:
                self.context.pipeline(send, recv, code)
        except TimeoutError as exc:
            raise self._named(*exc.args[0]) from None

    def _named(self, kind: str, missing: list, gave_up: list) -> SharedMemoryTimeout:
        from mpi4py import MPI

        def world(node_ranks):
            return MPI.Group.Translate_ranks(self.comm.Get_group(), node_ranks, MPI.COMM_WORLD.Get_group())

        where = f"shared-memory allreduce on {socket.gethostname()}"
        if kind == "timeout":
            return SharedMemoryTimeout(f"{where}: world rank(s) {world(missing)} did not arrive within "
                                       f"{self.timeout_s:g} s (HPC_TRAIN_SHM_TIMEOUT_S): hung, stopped, or "
                                       f"not calling this collective")
        return SharedMemoryTimeout(f"{where}: world rank(s) {world(gave_up)} gave up on this call (their "
                                   f"own error says why); world rank(s) {world(missing)} had not arrived")

    @staticmethod
    def takes(array) -> bool:
        """Exactly the element types the C side reduces, decided identically on every rank."""
        return array.dtype in _FLAG_DTYPES and array.dtype.isnative

    def accepts(self, array) -> bool:
        """Whether the single-call small path takes this array."""
        return array.nbytes <= self.slot_bytes and self.takes(array)


def load_flagshm(node_comm):
    """flagshm.c's module on every rank of node_comm, or None on every rank (collective).

    Node-local rank 0 compiles while the others wait, and tells them where; all ranks must agree, since a
    rank on the C path and one on the Python path would never meet.
    """
    from mpi4py import MPI

    from .. import native

    built = problem = module = None
    if node_comm.Get_rank() == 0:  # it decides for the node, whatever its peers' environments say
        if native.disabled():
            problem = f"{native.DISABLE_VARIABLE}=1"
        else:
            try:
                built = str(native.build("hpc_train.comm", "flagshm.c", "_flagshm"))
            except native.NativeUnavailable as exc:
                problem = str(exc)
    built, problem = node_comm.bcast((built, problem), root=0)  # where it went (a private cache, maybe)
    if built is not None:
        try:
            module = native.import_built(Path(built), "_flagshm")
        except native.NativeUnavailable as exc:
            problem = str(exc)
    if node_comm.allreduce(module is not None, op=MPI.LAND):
        return module
    if problem:
        log.warning("small-message shared-memory allreduce unavailable (%s); using the Python path", problem)
    return None


class NodeWindow:
    """A communicator's shared-memory workspace: the chunk ring and the small-message flags."""

    def __init__(self, node_comm, chunk_bytes: int | None = None):
        chunk_bytes = chunk_bytes or pipeline_chunk_bytes()
        self.comm = node_comm
        self.chunk_bytes = chunk_bytes
        self.shared = SharedSegments(node_comm, NBUF * chunk_bytes)
        self.counter = 0
        module = load_flagshm(node_comm) if node_comm.Get_size() > 1 else None
        self.flags = FlagPath(node_comm, module) if module is not None else None

    def slot(self, owner: int, chunk: int, dtype) -> np.ndarray:
        b = chunk % NBUF
        raw = self.shared.segments[owner][b * self.chunk_bytes : (b + 1) * self.chunk_bytes]
        return raw.view(dtype)

    def allreduce(self, send, recv, op: ReduceOp, inter_node=None) -> None:
        """recv = node-wide reduction of send (send may be recv).

        `inter_node(piece)`, when given, reduces this rank's fully node-reduced slice
        of each chunk across nodes in place (hierarchical allreduce).
        """
        if inter_node is None and self.flags is not None and self.flags.takes(send):
            # `mean` is scaled by the caller, after the algorithm
            self.flags.allreduce(send, recv, FLAG_OPCODES["sum" if op.scale_by_size else op.name])
            return
        comm, p, r = self.comm, self.comm.Get_size(), self.comm.Get_rank()
        per = self.chunk_bytes // send.dtype.itemsize
        n = send.size
        nchunks = -(-n // per)
        ufunc = op.ufunc()
        base = self.counter
        for t in range(nchunks + 2):
            if t < nchunks:  # publish the slices other ranks reduce; ours is read from send
                lo = t * per
                counts, offsets = partition(min(n, lo + per) - lo, p)
                slot = self.slot(r, base + t, send.dtype)
                for q in range(p):
                    if q != r:
                        a, b = offsets[q], offsets[q] + counts[q]
                        slot[a:b] = send[lo + a : lo + b]
            if 1 <= t <= nchunks:
                lo = (t - 1) * per
                counts, offsets = partition(min(n, lo + per) - lo, p)
                a, b = offsets[r], offsets[r] + counts[r]
                sources = [self.slot(q, base + t - 1, send.dtype)[a:b] for q in range(p)]
                target, sources[r] = sources[r], send[lo + a : lo + b]
                _reduce_into(target, sources, r, ufunc)
                if inter_node is not None:
                    inter_node(target)
            if t >= 2:
                lo = (t - 2) * per
                counts, offsets = partition(min(n, lo + per) - lo, p)
                for q in range(p):
                    a, b = offsets[q], offsets[q] + counts[q]
                    recv[lo + a : lo + b] = self.slot(q, base + t - 2, send.dtype)[a:b]
            if t <= nchunks:
                comm.Barrier()
        self.counter += nchunks


def _reduce_into(target, sources, r: int, ufunc) -> None:
    """target = reduction of all sources, starting from rank r's own; target may alias it."""
    p = len(sources)
    if p == 1:
        if target is not sources[0]:
            target[...] = sources[0]
        return
    ufunc(sources[r], sources[(r + 1) % p], out=target)
    for k in range(2, p):
        ufunc(target, sources[(r + k) % p], out=target)


def allreduce_shared(alloc: SharedSegments, offset: int, array, op: ReduceOp,
                     chunk_bytes: int | None = None, inter_node=None) -> None:
    """In-place allreduce of `array`, which lies at byte `offset` of this rank's shared segment."""
    comm, p, r = alloc.comm, alloc.comm.Get_size(), alloc.comm.Get_rank()
    n, dtype = array.size, array.dtype
    arrays = [alloc.segments[q][offset : offset + array.nbytes].view(dtype) for q in range(p)]
    per = max(1, (chunk_bytes or pipeline_chunk_bytes()) // dtype.itemsize)
    nchunks = -(-n // per)
    ufunc = op.ufunc()
    comm.Barrier()  # every rank's input is complete
    for t in range(nchunks + 1):
        if t < nchunks:
            lo = t * per
            counts, offsets = partition(min(n, lo + per) - lo, p)
            a, b = lo + offsets[r], lo + offsets[r] + counts[r]
            sources = [x[a:b] for x in arrays]
            _reduce_into(sources[r], sources, r, ufunc)
            if inter_node is not None:
                inter_node(sources[r])
        if t >= 1:
            lo = (t - 1) * per
            counts, offsets = partition(min(n, lo + per) - lo, p)
            for q in range(p):
                if q != r:
                    a, b = lo + offsets[q], lo + offsets[q] + counts[q]
                    arrays[r][a:b] = arrays[q][a:b]
        comm.Barrier()


def reduce_scatter_shared(alloc: SharedSegments, offset: int, array, op: ReduceOp,
                          chunk_bytes: int | None = None, inter_node=None):
    """Reduce node rank r's piece r (`partition(array.size, p)`) of `array` over every rank's copy.

    `array` lies at byte `offset` of each rank's segment. After the call this rank's
    piece holds the reduction (then `inter_node(piece)`); its other elements are
    untouched. Only an entry barrier: peers may still be reading this rank's other
    pieces when it returns, so nobody may write `array` again before a later node
    barrier (the node-shared optimizer's step ends with one). Returns the piece.
    """
    comm, p, r = alloc.comm, alloc.comm.Get_size(), alloc.comm.Get_rank()
    counts, offsets = partition(array.size, p)
    a, b = offsets[r], offsets[r] + counts[r]
    pieces = [alloc.segments[q][offset : offset + array.nbytes].view(array.dtype)[a:b] for q in range(p)]
    per = max(1, (chunk_bytes or pipeline_chunk_bytes()) // array.dtype.itemsize)
    ufunc = op.ufunc()
    comm.Barrier()  # every rank's input is complete
    for lo in range(0, b - a, per):  # chunks stay in cache across the p - 1 passes
        _reduce_into(pieces[r][lo : lo + per], [x[lo : lo + per] for x in pieces], r, ufunc)
    if inter_node is not None:
        inter_node(pieces[r])
    return pieces[r]


def gather_pieces_shared(arrays, node_comm) -> None:
    """Copy every other node rank's piece (`partition(x.size, p)`) of each x into this rank's x.

    The counterpart of `reduce_scatter_shared`: each x lies in this rank's shared segment and
    peer q's piece of its own x holds q's result. Barriers on `node_comm` before (every piece
    final) and after (nobody writes its x while a peer still reads it).
    """
    node_comm.Barrier()
    for x in arrays:
        alloc, p = x._shared, x._shared.comm.Get_size()
        r, offset = alloc.comm.Get_rank(), x.ctypes.data - alloc.address
        counts, offsets = partition(x.size, p)
        flat = x.reshape(-1)
        for q in range(p):
            if q != r:
                peer = alloc.segments[q][offset : offset + x.nbytes].view(x.dtype)
                flat[offsets[q] : offsets[q] + counts[q]] = peer[offsets[q] : offsets[q] + counts[q]]
    node_comm.Barrier()


class NodeArray(np.ndarray):
    """An array of which each node holds one copy in shared memory (see `node_array`)."""

    _window = None

    def __array_finalize__(self, obj):
        self._window = getattr(obj, "_window", None)  # views keep the window alive


def node_array(node_comm, count: int, dtype=np.float32) -> NodeArray:
    """One array per node: node rank 0 allocates it in shared memory, every rank maps the same bytes.

    Collective over the node. Writes by any rank are seen by all; ordering them
    (disjoint pieces, a barrier before reading) is the caller's duty.
    """
    from mpi4py import MPI

    dtype = np.dtype(dtype)
    nbytes = count * dtype.itemsize if node_comm.Get_rank() == 0 else 0
    win = MPI.Win.Allocate_shared(nbytes, dtype.itemsize, comm=node_comm)
    buffer, _ = win.Shared_query(0)
    array = np.frombuffer(buffer, dtype, count=count).view(NodeArray)
    array._window = win
    if node_comm.Get_rank() == 0:
        array.fill(0)  # first touch here, not inside a timed step
    node_comm.Barrier()
    return array


class SharedArray(np.ndarray):
    """A numpy array in node-shared memory; reduced in place without copy-in."""

    _shared: SharedSegments | None = None

    def __array_finalize__(self, obj):
        self._shared = getattr(obj, "_shared", None)

    def shared_offset(self, comm) -> int | None:
        """Byte offset inside this rank's segment, if this array can take the zero-copy path."""
        alloc = self._shared
        if alloc is None or alloc.comm is not comm or not self.flags.c_contiguous:
            return None
        offset = self.ctypes.data - alloc.address
        return offset if offset >= 0 and offset + self.nbytes <= alloc.nbytes else None


def shared_empty(node_comm, shape, dtype=np.float32) -> SharedArray:
    """Allocate an uninitialized array in node-shared memory (collective over the node)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    alloc = SharedSegments(node_comm, count * dtype.itemsize)
    mine = alloc.segments[node_comm.Get_rank()]
    array = mine.view(dtype)[:count].reshape(shape).view(SharedArray)
    array._shared = alloc
    return array

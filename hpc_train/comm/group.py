"""A communicator together with what our algorithms keep per communicator.

Topology (node / cross-node splits) and scratch buffers are built once per
communicator and reused: fresh temporaries on every call cost page faults that
show up directly in allreduce bandwidth.
"""

from __future__ import annotations

import numpy as np

from .. import runtime


class Group:
    def __init__(self, comm, topology: runtime.Topology | None = None):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.topology = topology or runtime.build_topology(comm)
        self._scratch: dict[str, np.ndarray] = {}
        self._node_window = None

    def scratch(self, slot: str, count: int, dtype, xp=np):
        """A reusable buffer of `count` elements for `slot`, grown geometrically when needed."""
        key = f"{slot}:{xp.__name__}"
        dtype = np.dtype(dtype)
        nbytes = count * dtype.itemsize
        buf = self._scratch.get(key)
        if buf is None or buf.nbytes < nbytes:
            capacity = max(nbytes, 2 * buf.nbytes if buf is not None else 0, 64)
            buf = xp.empty(capacity, dtype=np.uint8)
            self._scratch[key] = buf
        return buf[:nbytes].view(dtype)

    def node_window(self):
        """The node's shared-memory workspace used by the shm and hierarchical algorithms."""
        if self._node_window is None:
            from .shm import NodeWindow

            self._node_window = NodeWindow(self.topology.node)
        return self._node_window


_groups: dict[int, Group] = {}


def group_for(comm=None) -> Group:
    """The Group of `comm` (default: the world), built on first use (collective then)."""
    rt = runtime.runtime()
    if comm is None:
        comm = rt.world
    key = comm.py2f()
    group = _groups.get(key)
    if group is None:
        topology = rt.topology if key == rt.world.py2f() else None
        group = _groups[key] = Group(comm, topology)
    return group

"""Node-shared placement: one copy of a torch model's parameters and optimizer state per node.

The scheme of hpc_train's own NodeSharedOptimizer (optim/node_shared.py) for torch modules.
The node holds its parameters once, in shared memory laid out like the gradients' fusion
buffers, and the module's parameters become views of it. Node rank l owns piece l of every
bucket: a bucket is reduce-scattered so that this rank's piece of its gradients holds the mean
over every rank; `step()` runs an optimizer of the wrapped one's class and hyperparameters on
this rank's pieces only, and a node barrier publishes them before any rank's next forward.
P ranks of a node thus apply one update between them instead of P identical ones.

Pieces updated separately equal the whole update only for element-wise optimizers
(`ELEMENTWISE`); others are refused. A piece never spans two parameters, so a parameter no
rank used is skipped exactly as torch skips it (its step count included). State tensors are
created by torch itself at a piece's first step (its own initialization rules hold, e.g.
SGD's first momentum buffer), then moved into the node's copy; per-parameter scalars (Adam's
`step`) go to a small node-shared table. So `state_dict()` on any one rank holds the whole
state, in the wrapped optimizer's format, without communication.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch

from ..comm import allgather_node, node_barrier, node_shared_array, partition, reduce_scatter_node_async
from ..runtime import topology
from .tensors import as_tensor

ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
               torch.optim.Adadelta, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.ASGD,
               torch.optim.Rprop)


def refusal(optimizer: torch.optim.Optimizer, compression) -> str | None:
    """Why node-shared mode cannot run this optimizer (None: it can)."""
    if compression is not None:
        return (f"node-shared mode reduces gradients in place where they lie: compression {compression!r} "
                f"needs node_shared=False")
    if type(optimizer) not in ELEMENTWISE:
        names = ", ".join(cls.__name__ for cls in ELEMENTWISE)
        return (f"node-shared mode updates each rank's piece of a parameter separately, which equals the whole "
                f"update only for element-wise optimizers ({names}); {type(optimizer).__qualname__} is not one "
                f"of them: pass node_shared=False")
    return None


def _same_kind(optimizer: torch.optim.Optimizer, params_per_group: list[list]) -> torch.optim.Optimizer:
    """A fresh optimizer of `optimizer`'s class, each param group's hyperparameters kept, on other tensors."""
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    defaults = {key: value for key, value in optimizer.defaults.items() if key in accepted}
    groups = [dict(group, params=params) for group, params in zip(optimizer.param_groups, params_per_group,
                                                                   strict=True)]
    return cls(groups, **defaults)


class StateKinds(NamedTuple):
    """A param group's optimizer state: entries kept per element, and per-parameter scalars
    (name -> the torch dtype of a 0-d tensor, or the Python type of a plain number)."""

    elementwise: tuple[str, ...]
    scalars: dict


def state_kinds(optimizer: torch.optim.Optimizer) -> list[StateKinds]:
    """Each param group's state entries, from one step of a fresh optimizer of the same class and
    hyperparameters on a two-element stand-in per group (an entry shaped like it is per element)."""
    probes = [torch.zeros(2) for _ in optimizer.param_groups]
    twin = _same_kind(optimizer, [[probe] for probe in probes])
    for probe in probes:
        probe.grad = torch.ones(2)
    twin.step()
    kinds = []
    for probe in probes:
        state = twin.state.get(probe, {})
        elementwise = tuple(sorted(key for key, v in state.items() if torch.is_tensor(v) and v.shape == probe.shape))
        scalars = {key: v.dtype if torch.is_tensor(v) else type(v) for key, v in sorted(state.items())
                   if key not in elementwise}
        kinds.append(StateKinds(elementwise, scalars))
    return kinds


def _scalar(value: float, kind):
    return torch.tensor(value, dtype=kind) if isinstance(kind, torch.dtype) else kind(value)


class Piece(NamedTuple):
    """This rank's elements [start, stop) of buffer k, all of parameter `index`."""

    index: int
    k: int
    start: int
    stop: int
    tensor: torch.Tensor  # the node's parameter values there
    grad: torch.Tensor  # this rank's gradient buffer there


class _Update:
    """An optimizer of the wrapped one's class and hyperparameters over some pieces, its state kept in
    the node's copy (views) and scalar table."""

    def __init__(self, node: NodeShared, pieces: list[Piece]):
        self.node, self.pieces = node, pieces
        by_group = [[] for _ in node.optimizer.param_groups]
        for piece in pieces:
            by_group[node.group_of[piece.index]].append(piece.tensor)
        self.optimizer = _same_kind(node.optimizer, by_group)
        self.views = [{kind: node._state[kind][piece.k][piece.start : piece.stop]
                       for kind in node.kinds[node.group_of[piece.index]].elementwise} for piece in pieces]

    def step(self, used: np.ndarray) -> None:
        for outer, inner in zip(self.node.optimizer.param_groups, self.optimizer.param_groups, strict=True):
            inner.update({key: value for key, value in outer.items() if key != "params"})  # schedulers set lr there
        for piece in self.pieces:
            piece.tensor.grad = piece.grad if used[piece.index] else None
        self.optimizer.step()
        self._adopt()

    def _adopt(self) -> None:
        """Move state tensors torch created into the node's copy; publish per-parameter scalars."""
        node = self.node
        for piece, views in zip(self.pieces, self.views, strict=True):
            state = self.optimizer.state.get(piece.tensor)
            if not state:
                continue
            for kind, view in views.items():
                if state[kind] is not view:
                    if state[kind].dtype != view.dtype:
                        raise TypeError(f"{type(self.optimizer).__name__} keeps its {kind!r} state in "
                                        f"{state[kind].dtype} for {view.dtype} parameters: node-shared mode needs "
                                        f"node_shared=False")
                    view.copy_(state[kind])
                    state[kind] = view
            for kind in node.kinds[node.group_of[piece.index]].scalars:
                node._scalars[node._row[kind], piece.index] = float(state[kind])
            node._created[piece.index] = 1

    def restore(self) -> None:
        """Take the pieces' state from the node's copy (after a load, or where other ranks stepped them)."""
        node = self.node
        for piece, views in zip(self.pieces, self.views, strict=True):
            if not node._created[piece.index]:
                self.optimizer.state.pop(piece.tensor, None)
                continue
            state = dict(views)
            state.update({kind: _scalar(node._scalars[node._row[kind], piece.index], dtype)
                          for kind, dtype in node.kinds[node.group_of[piece.index]].scalars.items()})
            self.optimizer.state[piece.tensor] = state


class NodeShared:
    """One copy per node (see the module docstring). `params` are the optimizer's (name, parameter),
    `slots[i]` parameter i's (buffer, offset) in the fusion layout, `regions` the buckets as
    (buffer, start, stop), `grads` the node-shared gradient buffers (one a dtype).

    While ranks of the node have joined (run out of data: `DistributedOptimizer.join`), every rank
    holds whole gradients and the others step the joined ranks' pieces too, split between them."""

    compresses = False

    def __init__(self, optimizer: torch.optim.Optimizer, params: list, slots: list[tuple[int, int]],
                 regions: list[tuple[int, int, int]], grads: list[np.ndarray], comm):
        self.optimizer, self.params, self.slots, self._grads = optimizer, params, slots, grads
        self._regions = regions
        self._buckets = [grads[k][start:stop] for k, start, stop in regions]  # what is reduce-scattered
        self.kinds = state_kinds(optimizer)
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self.group_of = [group_of[id(p)] for _, p in params]
        values = [node_shared_array(g.size, g.dtype, comm=comm) for g in grads]
        self._values = [as_tensor(v) for v in values]
        self._node = topology().node
        pieces = self._cut(self._node.Get_rank())
        with torch.no_grad():
            for piece in pieces:  # every rank its pieces of rank 0's values (broadcast before)
                _, p = params[piece.index]
                offset = slots[piece.index][1]
                piece.tensor.copy_(p.detach().reshape(-1)[piece.start - offset : piece.stop - offset])
        elementwise = sorted({kind for kinds in self.kinds for kind in kinds.elementwise})
        self._state = {kind: [as_tensor(node_shared_array(g.size, g.dtype, comm=comm)) for g in grads]
                       for kind in elementwise}
        scalars = sorted({kind for kinds in self.kinds for kind in kinds.scalars})
        self._row = {kind: row for row, kind in enumerate(scalars)}
        self._scalars = node_shared_array(max(1, len(scalars)) * len(params), np.float64,
                                          comm=comm).reshape(-1, len(params))
        self._created = node_shared_array(len(params), np.uint8, comm=comm)  # parameter i has optimizer state
        node_barrier(comm=comm)  # every piece copied in before anyone reads the node's copy
        for i, (_, p) in enumerate(params):
            p.data = self._whole(self._values, i)
        self.own = _Update(self, pieces) if pieces else None
        self._takeovers: dict[tuple[int, ...], _Update | None] = {}
        if optimizer.state:  # created before wrapping (loaded, or made by the constructor, as Adagrad's)
            self.load_state_dict(optimizer.state_dict())

    @property
    def pieces(self) -> list[Piece]:
        return self.own.pieces if self.own else []

    def _cut(self, node_rank: int) -> list[Piece]:
        """Node rank `node_rank`'s pieces of every bucket, cut where parameters meet.

        Piece l of a bucket is what reduce_scatter_node reduced on node rank l. Where nodes differ in
        size, every rank holds the whole average instead, and buckets are cut into as many pieces as
        the largest node has ranks (a smaller node's ranks take several each): every node then runs
        the same kernels on the same pieces, as it must, since torch's reduced-precision kernels round
        differently near a tensor's end than inside it (the nodes' copies would drift apart).
        """
        ways, local = max(topology().node_sizes), self._node.Get_size()
        mine: dict[int, list[tuple[int, int]]] = {}
        for k, start, stop in self._regions:
            counts, offsets = partition(stop - start, ways)
            mine.setdefault(k, []).extend((start + offsets[j], start + offsets[j] + counts[j])
                                          for j in range(node_rank, ways, local))
        pieces = []
        for i, (k, offset) in enumerate(self.slots):
            end = offset + self.params[i][1].numel()
            for lo, hi in mine.get(k, ()):
                a, b = max(lo, offset), min(hi, end)
                if a < b:
                    pieces.append(Piece(i, k, a, b, torch.nn.Parameter(self._values[k][a:b], requires_grad=False),
                                        as_tensor(self._grads[k])[a:b]))
        return pieces

    def _whole(self, buffers: list[torch.Tensor], i: int) -> torch.Tensor:
        """Parameter i's elements of per-dtype buffers, in its shape."""
        k, offset = self.slots[i]
        p = self.params[i][1]
        return buffers[k][offset : offset + p.numel()].view(p.shape)

    # -- reduction -------------------------------------------------------------------------------------------

    def start(self, grads, wire, size: int, name: str):
        return reduce_scatter_node_async(grads, "mean", name=name)

    def finish(self, grads, wire) -> None:
        pass

    def complete(self, joined: tuple[int, ...] = ()) -> None:
        if joined and self._node.Get_rank() not in joined and joined not in self._takeovers:
            # the joined ranks' pieces dealt out, their state read from the node's copy before any rank of the
            # node steps: the gather's first barrier comes after this
            self._takeovers[joined] = self._take_over(joined)
        allgather_node(self._buckets)

    def norm_terms(self, complete: bool) -> tuple[list[torch.Tensor], bool]:
        if complete:  # every rank holds whole gradients (and some may step others' pieces)
            return [as_tensor(bucket) for bucket in self._buckets], False
        return [piece.grad for piece in self.pieces], True

    # -- the update ------------------------------------------------------------------------------------------

    def step(self, used: np.ndarray, joined: tuple[int, ...]) -> None:
        if not joined:
            self._takeovers.clear()  # a later join starts from the node's state again
        if self.own is not None:
            self.own.step(used)
        if joined and self._takeovers[joined] is not None:
            self._takeovers[joined].step(used)

    def _take_over(self, joined: tuple[int, ...]) -> _Update | None:
        """This rank's share of the pieces of node ranks that have joined (dealt round the others)."""
        active = [q for q in range(self._node.Get_size()) if q not in joined]
        orphans = [piece for q in joined for piece in self._cut(q)]
        mine = orphans[active.index(self._node.Get_rank()) :: len(active)]
        if not mine:
            return None
        update = _Update(self, mine)
        update.restore()
        return update

    def publish(self) -> None:
        node_barrier()

    # -- state in the wrapped optimizer's format ---------------------------------------------------------------

    @property
    def state(self) -> dict:
        """Parameter -> its whole state: views of the node's copy, scalars from the table."""
        state = defaultdict(dict)
        for i, (_, p) in enumerate(self.params):
            if self._created[i]:
                kinds = self.kinds[self.group_of[i]]
                entries = {kind: self._whole(self._state[kind], i) for kind in kinds.elementwise}
                entries.update({kind: _scalar(self._scalars[self._row[kind], i], dtype)
                                for kind, dtype in kinds.scalars.items()})
                state[p] = entries
        return state

    def state_dict(self) -> dict:
        self.optimizer.state = self.state
        try:
            return self.optimizer.state_dict()
        finally:
            self.optimizer.state = defaultdict(dict)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load through the wrapped optimizer (its checks, casts and hyperparameters), then keep this
        rank's pieces of the state in the node's copy (not collective: each rank writes its own)."""
        self.optimizer.load_state_dict(state_dict)
        loaded, self.optimizer.state = self.optimizer.state, defaultdict(dict)
        for i, (name, p) in enumerate(self.params):
            entries = loaded.get(p)
            kinds = self.kinds[self.group_of[i]]
            missing = [kind for kind in (*kinds.elementwise, *kinds.scalars) if entries and kind not in entries]
            if missing:
                raise ValueError(f"load_state_dict: the state of parameter {name} lacks {', '.join(missing)}, "
                                 f"which {type(self.optimizer).__name__} keeps for its param group")
            for kind in kinds.scalars if entries else ():
                self._scalars[self._row[kind], i] = float(entries[kind])
            self._created[i] = 1 if entries else 0
        if self.own is None:
            return
        for piece, views in zip(self.own.pieces, self.own.views, strict=True):
            entries = loaded.get(self.params[piece.index][1])
            offset = self.slots[piece.index][1]
            for kind, view in views.items() if entries else ():
                view.copy_(entries[kind].reshape(-1)[piece.start - offset : piece.stop - offset])
        self.own.restore()

"""Starting every rank from rank 0's model and optimizer: parameters, buffers and optimizer state.

Tensors travel as buffers (one broadcast each, in name order); only the optimizer's
small skeleton (its param groups' hyperparameters and, per state entry, a shape and
dtype) is pickled. Before anything moves, ranks agree on what they are about to
receive: a model whose parameters differ between ranks raises CollectiveMismatchError
on every rank naming the first differing one, instead of hanging or corrupting.
"""

from __future__ import annotations

import torch

from ..comm.check import raise_if_any, verify_same_items
from ..runtime import rank, world
from .collectives import broadcast_


def named_tensors(params) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a module (its state_dict: parameters and buffers), a dict (in name
    order) or an iterable of pairs (in its order, as Horovod takes it)."""
    if isinstance(params, torch.nn.Module):
        params = params.state_dict()
    if isinstance(params, dict):
        return sorted(params.items())
    pairs = list(params)
    if not all(isinstance(pair, tuple) and len(pair) == 2 for pair in pairs):
        raise TypeError("broadcast_parameters takes a module, a state_dict or (name, tensor) pairs "
                        "(named_parameters()); a bare list of tensors has no names to check ranks against")
    return pairs


def signature(pairs) -> list[str]:
    """One line a tensor: what every rank must agree on."""
    return [f"{name} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for name, t in pairs]


def broadcast_parameters(params, root_rank: int = 0, *, root: int | None = None) -> None:
    """Copy root's tensors into every rank's, in place (collective)."""
    root = root_rank if root is None else root
    pairs = named_tensors(params)
    verify_same_items(world(), "broadcast_parameters", signature(pairs))
    with torch.no_grad():
        for name, tensor in pairs:
            broadcast_(tensor, root, name=name)


def _skeleton(state_dict: dict) -> dict:
    """The state dict with every tensor replaced by (shape, dtype): what the other ranks allocate."""
    state = {index: {key: ("tensor", tuple(v.shape), v.dtype) if torch.is_tensor(v) else ("value", v)
                     for key, v in entries.items()}
             for index, entries in state_dict["state"].items()}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0, *,
                              root: int | None = None) -> None:
    """Give every rank root's optimizer state and hyperparameters (collective). A root whose state
    was not created yet (no step taken) sends none, and the other ranks' is cleared."""
    root = root_rank if root is None else root
    comm = world()
    mine = optimizer.state_dict()
    skeleton = comm.bcast(_skeleton(mine) if rank() == root else None, root=root)
    groups = [len(g["params"]) for g in skeleton["param_groups"]]
    ours = [len(g["params"]) for g in mine["param_groups"]]
    raise_if_any(comm, None if groups == ours else
                 f"broadcast_optimizer_state: rank {rank()}'s optimizer has param groups of {ours} parameters, "
                 f"rank {root}'s of {groups}", ValueError)
    state = {}
    for index in sorted(skeleton["state"]):
        entries = {}
        for key in sorted(skeleton["state"][index]):
            kind, *described = skeleton["state"][index][key]
            if kind == "value":
                entries[key] = described[0]
                continue
            shape, dtype = described
            tensor = mine["state"][index][key] if rank() == root else torch.empty(shape, dtype=dtype)
            entries[key] = broadcast_(tensor, root, name=f"optimizer.state.{index}.{key}")
        state[index] = entries
    if rank() != root:
        optimizer.load_state_dict({"state": state, "param_groups": skeleton["param_groups"]})

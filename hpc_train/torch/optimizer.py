"""`DistributedOptimizer` for torch: gradients averaged over the ranks while backward still runs.

The scheme of hpc_train's own data-parallel strategy (`optim/distributed.py`), fed by
torch's autograd. Every trainable parameter's `.grad` becomes a view of a flat fusion
buffer in node-shared memory (one a dtype), laid out in reverse registration order
and cut into buckets (`optim.layout`), so the shared-memory reduction needs no copy
in. A post-accumulate-grad hook announces each gradient as final; complete buckets
are averaged in place on the background engine in index order (`BucketQueue`), the
same order on every rank. `step()` waits, then steps the wrapped optimizer.

Semantics are DDP's, so that a DDP script's results carry over: gradients are summed
over backward passes (`backward_passes_per_step`, `no_sync()`) and averaged over
ranks; a parameter no rank used keeps `grad=None` (the optimizer leaves it alone),
one unused on some ranks only counts as zeros there; frozen parameters are left out;
a tied parameter is reduced once. Like DDP, the wrapper starts every rank from rank 0's
parameters and buffers.

Where parameters and optimizer state live is its placement (`placement.py`): replicas on
every rank, or one copy per node (`node_shared.py`, the default where it applies).
"""

from __future__ import annotations

import gc
import math
import time
import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch

from ..comm import allgather, allreduce, allreduce_async, engine, shared_empty
from ..comm.check import verify_same_items
from ..optim.distributed import compressed_dtype
from ..optim.layout import BucketQueue, concatenate, lay_out
from ..runtime import topology, world
from .collectives import Average, broadcast_, reduce_op
from .node_shared import NodeShared, refusal
from .placement import Replicas
from .state import broadcast_optimizer_state, broadcast_parameters, signature
from .tensors import as_tensor, numpy_dtype

# torch 2.13 announces that GradScaler will stop passing itself to optimizers that handle scaling,
# with a FutureWarning at every scaler.step(opt) of ours; the tests say when it really does
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)


def _named(model, named_parameters) -> dict[int, str]:
    """id(parameter) -> its first name (a tied parameter has several)."""
    if named_parameters is None and model is not None:
        named_parameters = model.named_parameters() if isinstance(model, torch.nn.Module) else model
    names: dict[int, str] = {}
    for name, p in named_parameters or ():
        names.setdefault(id(p), name)
    return names


def _wrapped(attribute: str) -> property:
    """The wrapped optimizer's attribute, read and written through (what torch's schedulers and
    GradScaler touch on the optimizer they are given)."""
    return property(lambda self: getattr(self.optimizer, attribute),
                    lambda self, value: setattr(self.optimizer, attribute, value))


_LIVE: weakref.WeakSet = weakref.WeakSet()  # DistributedOptimizers not closed yet, for the module-level join()


def join() -> int:
    """Horovod's `hvd.join()`: the join() of the one DistributedOptimizer in use (see its docstring)."""
    live = list(_LIVE)
    if len(live) != 1:  # optimizers dropped without close() still count until collected
        gc.collect()
        live = list(_LIVE)
    if len(live) != 1:
        raise ValueError(f"hpc_train.torch.join(): {len(live)} DistributedOptimizers are in use; call join() on "
                         f"the one whose ranks ran out of data (opt.join())")
    return live[0].join()


class DistributedOptimizer(torch.optim.Optimizer):
    """Wrap a `torch.optim.Optimizer` so that `step()` applies gradients averaged over all ranks.

    `model` is the module (or its `named_parameters()`, Horovod's second argument) whose parameters
    the optimizer trains; buckets hold about `bucket_mb` MiB. `compression` (`Compression.fp16` or
    `bf16`) sends float32 buckets in 16 bits. `node_shared` keeps one copy of parameters and state
    per node (None: wherever it applies, i.e. an element-wise optimizer and no compression). A wait
    longer than `stall_warning_s` names the ranks that have not joined; after `stall_abort_s` the job
    aborts. It is itself a torch optimizer, so learning-rate schedulers take it; `param_groups` and
    `state` are the wrapped optimizer's (in node-shared mode, its state is views of the node's copy).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model=None, *, named_parameters=None,
                 bucket_mb: float = 25.0, compression=None, backward_passes_per_step: int = 1, op: str = Average,
                 node_shared: bool | None = None, stall_warning_s: float = 60.0, stall_abort_s: float = 600.0):
        if backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        if reduce_op(op) != "mean":
            raise ValueError(f"DistributedOptimizer averages gradients over ranks: op {op!r} is not supported")
        why_not = refusal(optimizer, compression)
        if node_shared and why_not:
            raise ValueError(f"DistributedOptimizer: {why_not}")
        self.optimizer, self.model = optimizer, model if isinstance(model, torch.nn.Module) else None
        self.passes_per_step = backward_passes_per_step
        self.stall_warning_s, self.stall_abort_s = stall_warning_s, stall_abort_s
        # torch.optim.Optimizer's own machinery (step hooks, profiling), without its __init__, which
        # would rebuild the param groups the wrapped optimizer owns
        for hooks in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                      "load_state_dict_post"):
            setattr(self, f"_optimizer_{hooks}_hooks", OrderedDict())
        self._patch_step_function()
        self._params = self._trainable(_named(model, named_parameters))
        comm = engine().comm
        self.size = comm.Get_size()
        verify_same_items(world(), "DistributedOptimizer parameters", signature(self._params))
        broadcast_parameters(self.model if self.model is not None else self._params)  # as DDP: rank 0's values
        shared = why_not is None if node_shared is None else node_shared
        self._build_buffers(bucket_mb, None if shared else compressed_dtype(compression), comm)
        self._placement = (NodeShared(optimizer, self._params, self._slots, self._regions, self._flats, comm)
                           if shared else Replicas(optimizer))
        self.node_shared = shared
        # agreed every step in one small allreduce (max): which parameters backward reached since the last
        # step, then this rank + 1 while it trains (0 once it joined), then 1 if it joined
        n = len(self._params)
        self._flags = np.zeros(n + 2)
        self._flags[n] = world().Get_rank() + 1
        self._flags_anywhere = np.zeros_like(self._flags)
        self._used, self._used_anywhere = self._flags[:n], self._flags_anywhere[:n]
        self._last_active = -1  # the highest rank that still trained in the latest step
        self._joined = ()  # ranks of this node that have joined, while any rank has
        self._completed = False  # this step's gradients are whole on every rank of the node
        self._sync = True  # False inside no_sync()
        self._reducing = False  # a backward outside no_sync() ran since the last synchronize()
        self._synchronized = False
        self.exposed_s = 0.0
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, (_, p) in enumerate(self._params)]
        _LIVE.add(self)
        self._buffers: dict[torch.dtype, list[torch.Tensor]] = {}
        for _, b in sorted(self.model.named_buffers()) if self.model is not None else ():
            self._buffers.setdefault(b.dtype, []).append(b)
        self._buffers_root, self._buffers_synced = 0, False
        if self._buffers:
            self._hooks.append(self.model.register_forward_pre_hook(self._before_forward))

    # -- torch.optim.Optimizer's face: the wrapped optimizer's groups, state and defaults --------------------

    param_groups = _wrapped("param_groups")
    defaults = _wrapped("defaults")

    @property
    def state(self) -> dict:
        return self._placement.state

    def state_dict(self) -> dict:
        return self._placement.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._placement.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        raise ValueError("DistributedOptimizer: add every param group to the optimizer before wrapping it "
                         "(its gradients' buffers and buckets are laid out once)")

    # -- set-up --------------------------------------------------------------------------------------------

    def _trainable(self, names: dict[int, str]) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of every parameter the optimizer trains, once each, in the model's order."""
        unique = {}
        for g, group in enumerate(self.optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if p.requires_grad:
                    unique.setdefault(id(p), (names.get(id(p), f"param_groups.{g}.{i}"), p))
        if names:
            unnamed = [f"{tuple(p.shape)} {p.dtype}" for key, (_, p) in unique.items() if key not in names]
            if unnamed:
                raise ValueError(f"DistributedOptimizer: the optimizer trains {len(unnamed)} parameter(s) the model "
                                 f"does not have: {', '.join(unnamed[:5])}")
            order = list(names)
            if self.model is not None:
                untrained = [name for name, p in self.model.named_parameters() if p.requires_grad
                             and id(p) not in unique]
                if untrained:
                    raise ValueError(f"DistributedOptimizer: the model's parameter(s) {', '.join(untrained[:5])} need "
                                     f"gradients but the optimizer does not train them: add them to its param groups "
                                     f"or freeze them (requires_grad_(False)) before wrapping")
            return [unique[key] for key in order if key in unique]
        return list(unique.values())

    def _build_buffers(self, bucket_mb: float, wire_dtype, comm) -> None:
        """One fusion buffer a dtype (dtypes in name order), every gradient a view of it."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, (_, p) in enumerate(self._params):
            by_dtype.setdefault(p.dtype, []).append(index)
        layouts, self._flats, self._wires, self._regions, slots = [], [], [], [], {}
        for k, dtype in enumerate(sorted(by_dtype, key=str)):
            named = {self._params[i][0]: self._params[i][1] for i in by_dtype[dtype]}
            sizes = {name: SimpleNamespace(size=p.numel()) for name, p in named.items()}
            layout = lay_out(sizes, max(1, int(bucket_mb * (1 << 20)) // dtype.itemsize), False)
            flat = shared_empty(layout.total, numpy_dtype(dtype), comm=comm)
            flat[...] = 0
            compress = wire_dtype is not None and dtype == torch.float32
            self._flats.append(flat)
            self._wires.append(shared_empty(flat.size, wire_dtype, comm=comm) if compress else None)
            self._regions += [(k, b.start, b.stop) for b in layout.buckets]  # a bucket within its dtype's buffer
            slots.update({name: (k, offset) for name, offset in layout.offsets.items()})
            layouts.append(layout)
        self.layout = concatenate(layouts)  # every dtype's buckets in one order, the same on every rank
        self.queue = BucketQueue(self.layout, self.passes_per_step)
        self._index = {name: i for i, (name, _) in enumerate(self._params)}
        self._slots = [slots[name] for name, _ in self._params]  # (buffer, offset) of each gradient
        wholes = [as_tensor(flat) for flat in self._flats]
        self._views = [wholes[k][offset : offset + p.numel()].view_as(p)
                       for (k, offset), (_, p) in zip(self._slots, self._params, strict=True)]
        for (_, p), view in zip(self._params, self._views, strict=True):
            if p.grad is not None:
                view.copy_(p.grad)
            p.grad = view

    # -- backward ------------------------------------------------------------------------------------------

    def _hook(self, index: int):
        def ready(p: torch.nn.Parameter) -> None:
            view = self._views[index]
            if p.grad.data_ptr() != view.data_ptr():  # grads were set to None (or replaced) since the last step
                view.copy_(p.grad)
                p.grad = view
            self._used[index] = 1
            self._synchronized = False
            if self._sync:
                self._reducing = True  # on every rank alike, whether or not a bucket is complete yet here
                start = self.layout.offsets[self._params[index][0]]
                for bucket in self.queue.announce(start, start + p.numel()):
                    self._submit(bucket)

        return ready

    def _before_forward(self, module, inputs) -> None:
        """DDP's rule for module buffers (BatchNorm's running statistics): before the first forward of a step
        whose gradients will be reduced, each rank takes rank 0's (once some rank has joined, those of the
        highest rank still training), so that all ranks evaluate and checkpoint the same ones; averaging
        them instead would give statistics no rank computed. DDP repeats it before every such forward;
        once a step gives the same result with one backward pass a step, and lets a joined rank mirror it."""
        if torch.is_grad_enabled() and self._sync and not self._buffers_synced:
            self._broadcast_buffers()

    def _broadcast_buffers(self) -> None:
        """One broadcast a dtype, from `_buffers_root`."""
        with torch.no_grad():
            for dtype, tensors in self._buffers.items():
                flat = broadcast_(torch.cat([t.reshape(-1) for t in tensors]), self._buffers_root,
                                  name=f"module buffers ({str(dtype).removeprefix('torch.')})")
                for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
                    t.copy_(part.view_as(t))
        self._buffers_synced = True

    @contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients locally; the first one outside reduces them all."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _submit(self, bucket) -> None:
        for name in bucket.names:  # a parameter this rank's backward did not reach counts as zeros
            index = self._index[name]
            if not self._used[index]:
                self._views[index].zero_()
                self._params[index][1].grad = self._views[index]
        k, start, stop = self._regions[bucket.index]
        wire = self._wires[k]
        bucket.handle = self._placement.start(self._flats[k][start:stop], None if wire is None else wire[start:stop],
                                              self.size, f"bucket{bucket.index}")

    # -- the step --------------------------------------------------------------------------------------------

    def synchronize(self) -> None:
        """Reduce what backward did not, wait for every bucket; after it, `.grad` holds the average on
        every rank (for clipping or GradScaler's unscale_ before `step()`). Calling it again before the
        next backward does nothing (reducing again would find no parameter used)."""
        if not self._synchronized:
            self._reduce()
        if not self._completed:
            self._placement.complete()
            self._completed = True

    @contextmanager
    def skip_synchronize(self):
        """Horovod's spelling for "step() after synchronize()" (e.g. `scaler.step(opt)` after
        `opt.synchronize(); scaler.unscale_(opt)`): step() never reduces twice anyway."""
        if not self._synchronized:
            raise RuntimeError("DistributedOptimizer.skip_synchronize(): call synchronize() first, or the step "
                               "would apply this rank's own gradients")
        yield

    def _reduce(self) -> None:
        """Every bucket reduced as the placement wants it (node-shared: this rank's pieces)."""
        self._check_model_unchanged()
        for bucket in self.queue.remaining():
            self._submit(bucket)
        used = allreduce_async(self._flags, op="max", out=self._flags_anywhere, name="used parameters, joined ranks")
        waiting = time.perf_counter()
        watch = engine().wait_watched
        for bucket in self.layout.buckets:
            watch(bucket.handle, self.stall_warning_s, self.stall_abort_s)
            k, start, stop = self._regions[bucket.index]
            wire = self._wires[k]
            self._placement.finish(self._flats[k][start:stop], None if wire is None else wire[start:stop])
        watch(used, self.stall_warning_s, self.stall_abort_s)
        self.exposed_s = time.perf_counter() - waiting
        for index in np.flatnonzero(self._used_anywhere == 0):  # no rank used it: as DDP, no gradient
            self._params[index][1].grad = None
        self.queue.reset()
        self._used[:] = 0
        self._synchronized, self._reducing = True, False
        n = len(self._params)
        if self._flags_anywhere[n]:
            self._last_active = int(self._flags_anywhere[n]) - 1
        someone_joined = bool(self._flags_anywhere[n + 1])
        self._buffers_root = self._last_active if someone_joined else 0
        self._buffers_synced = False
        self._joined = ()
        if someone_joined:  # whole gradients everywhere, so that the joined ranks' share can be stepped
            mine = np.array([self._flags[n + 1]])
            self._joined = tuple(np.flatnonzero(allgather(mine, comm=topology().node)).tolist())
            self._placement.complete(self._joined)
        self._completed = someone_joined

    def _check_model_unchanged(self) -> None:
        if self.model is None:
            return
        known = {id(p) for _, p in self._params}
        added = [name for name, p in self.model.named_parameters() if p.requires_grad and id(p) not in known]
        if added:
            raise ValueError(f"DistributedOptimizer: parameter(s) {', '.join(added[:5])} were added to the model "
                             f"after wrapping its optimizer; wrap it once the model is complete")

    # GradScaler then hands itself to step() (`grad_scaler=`) instead of checking the gradients for
    # infs before it: those checks would read, and rewrite, gradients the engine is still reducing
    _step_supports_amp_scaling = True

    def step(self, closure=None, grad_scaler=None):
        """Wait for the averaged gradients (unless `synchronize()` already did), then step."""
        if grad_scaler is not None:
            return self._scaled_step(grad_scaler, closure)
        if closure is not None and not self.node_shared:  # LBFGS re-evaluates: every evaluation is averaged
            def averaged():
                with torch.enable_grad():
                    loss = closure()
                self.synchronize()
                return loss

            return self.optimizer.step(averaged)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._synchronized:
            self._reduce()
        self._synchronized = False
        self._placement.step(self._used_anywhere, self._joined)
        waiting = time.perf_counter()
        self._placement.publish()
        self.exposed_s += time.perf_counter() - waiting
        return loss

    def _scaled_step(self, scaler, closure):
        """`scaler.step(opt)`, plainly: Horovod's recipe done here. The gradients are averaged and made
        whole, unscaled (unless `scaler.unscale_(opt)` ran already), the inf/NaN checks agreed by every
        rank (their maximum), and the step skipped on every rank if any found one; `scaler.update()`
        then sees the agreed checks, so every rank keeps the same scale."""
        from torch.amp.grad_scaler import OptState

        self.synchronize()
        state = scaler._per_optimizer_states[id(self)]
        if state["stage"] is OptState.READY:
            scaler.unscale_(self)
        found = list(state["found_inf_per_device"].values())
        for flag in found:
            flag.view(1).copy_(torch.from_numpy(allreduce(flag.view(1).numpy().copy(), op="max", name="found inf")))
        if any(float(flag) for flag in found):
            return None
        return self.step(closure)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the averaged gradients of every parameter, from the
        pieces each rank holds (node-shared mode: no rank needs the whole gradient; the ranks of a node
        sum their shares). Call it between backward and `step()`; returns the total norm."""
        if not self._synchronized:
            self._reduce()
        tensors, node_sum = self._placement.norm_terms(self._completed)
        norm_type = float(norm_type)
        if norm_type == math.inf:
            local = max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)
        else:
            local = sum(float(torch.linalg.vector_norm(t, norm_type, dtype=torch.float64)) ** norm_type
                        for t in tensors)
        if node_sum:
            local = float(allreduce(np.array([local]), op="max" if norm_type == math.inf else "sum",
                                    comm=topology().node)[0])
        total = local if norm_type == math.inf else local ** (1.0 / norm_type)
        if error_if_nonfinite and not math.isfinite(total):
            raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is {total}")
        coefficient = max_norm / (total + 1e-6)
        if coefficient < 1.0:
            for t in tensors:
                t.mul_(coefficient)
        return torch.tensor(total, dtype=torch.float32)

    def join(self) -> int:
        """This rank has run out of data: take part in the other ranks' steps (contributing zero gradients,
        so the average still divides by every rank, as DDP's Join does by default) until every rank has
        called join(); then every rank takes the parameters, buffers and optimizer state of the rank that
        trained last (collective at the end). Returns that rank. Node-shared: the joined rank's pieces are
        stepped by the other ranks of its node meanwhile, from whole gradients."""
        if self._reducing:
            raise RuntimeError("DistributedOptimizer.join() was called after backward() but before step()")
        n = len(self._params)
        self._flags[n], self._flags[n + 1] = 0, 1
        try:
            while True:
                self.zero_grad()
                if self._buffers:
                    self._broadcast_buffers()  # as the training ranks do before their forward
                self._reduce()  # the same buckets, in the same order, as the ranks still training
                self._synchronized = False
                if not self._flags_anywhere[n]:
                    break  # every rank has joined
                self._placement.publish()
        finally:
            self._flags[n], self._flags[n + 1] = world().Get_rank() + 1, 0
        root = self._last_active
        if root >= 0:
            broadcast_parameters(self.model if self.model is not None else self._params, root=root)
            broadcast_optimizer_state(self, root=root)
        return root

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients. With `set_to_none` (torch's default) they become None: backward then
        hands each new gradient over whole and the hook copies it into its place in the fusion buffer,
        where zeroing the buffer first would cost a pass over it and make backward add into it. With
        `set_to_none=False` the buffers are zeroed and the gradients stay views of them."""
        if self._reducing:
            raise RuntimeError("DistributedOptimizer.zero_grad() was called after backward() but before step() "
                               "or synchronize(): gradients are still being reduced")
        if set_to_none:
            for _, p in self._params:
                p.grad = None
        else:
            for flat in self._flats:
                flat[...] = 0
            for (_, p), view in zip(self._params, self._views, strict=True):
                p.grad = view
        self.queue.reset()
        self._used[:] = 0

    def close(self) -> None:
        """Remove the hooks; gradients become ordinary tensors again (copies of the buffers)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        _LIVE.discard(self)
        for _, p in self._params:
            if p.grad is not None:
                p.grad = p.grad.clone()

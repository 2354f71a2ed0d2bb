"""Batch normalization over the global batch: `convert_sync_batchnorm(model)`.

Torch's own SyncBatchNorm needs a torch.distributed process group (without one it silently
normalizes over the local batch). Ours reduces with hpc_train's allreduce: in training, the
per-channel sum, sum of squares and count of every rank's batch make one allreduce in forward,
and the per-channel sums of dy and dy * x-hat one more in backward, so each rank's input
gradient carries every rank's loss through the shared statistics (the optimizer's average over
ranks then gives the gradient of the mean loss). Running statistics follow torch's update with
the global mean and unbiased variance. Evaluation uses the running statistics, with no
communication.
"""

from __future__ import annotations

import torch

from .collectives import Sum, allreduce_


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, mean and var over every rank's batch."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, name: str):
        dims = [d for d in range(x.dim()) if d != 1]
        stats = torch.stack([x.sum(dims, dtype=torch.float64), x.double().pow(2).sum(dims),
                             torch.full((x.shape[1],), x.numel() // x.shape[1], dtype=torch.float64)])
        allreduce_(stats, op=Sum, name=f"{name} statistics")
        total, count = stats[0], stats[2]
        mean = total / count
        var = (stats[1] / count - mean.pow(2)).clamp_min(0)
        shape = [1, -1] + [1] * (x.dim() - 2)
        invstd = (var + eps).rsqrt()
        xhat = ((x.double() - mean.view(shape)) * invstd.view(shape)).to(x.dtype)
        ctx.save_for_backward(xhat, weight, invstd.to(x.dtype), count)
        ctx.name = name
        ctx.mark_non_differentiable(mean, var, count)
        y = xhat if weight is None else xhat * weight.view(shape)
        y = y if bias is None else y + bias.view(shape)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _mean, _var, _count):
        xhat, weight, invstd, count = ctx.saved_tensors
        dims = [d for d in range(dy.dim()) if d != 1]
        shape = [1, -1] + [1] * (dy.dim() - 2)
        local = torch.stack([dy.sum(dims, dtype=torch.float64), (dy * xhat).sum(dims, dtype=torch.float64)])
        # this rank's own terms (the optimizer averages parameter gradients over ranks), taken before
        # the in-place allreduce below
        dweight = local[1].to(dy.dtype, copy=True) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = local[0].to(dy.dtype, copy=True) if ctx.needs_input_grad[2] else None
        allreduce_(local, op=Sum, name=f"{ctx.name} gradient sums")
        mean_dy, mean_dy_xhat = (local / count).to(dy.dtype)
        scale = invstd if weight is None else invstd * weight
        dx = (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * scale.view(shape)
        return dx, dweight, dbias, None, None


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch (every rank's), reduced with
    hpc_train's allreduce. Any input of 2 or more dimensions, channels in dimension 1."""

    def _check_input_dim(self, x) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects an input of 2 or more dimensions (N, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        y, mean, var, count = _GlobalBatchNorm.apply(x, self.weight, self.bias, self.eps,
                                                     f"SyncBatchNorm {tuple(x.shape[1:])}")
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                n = float(count[0])
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * (n / max(n - 1.0, 1.0))).to(self.running_var.dtype), momentum)
        return y


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every torch BatchNorm layer replaced by a SyncBatchNorm holding the same parameters,
    buffers and settings (as torch.nn.SyncBatchNorm.convert_sync_batchnorm, without a process group)."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, device=module.running_mean.device
                                  if module.running_mean is not None else None,
                                  dtype=module.weight.dtype if module.affine else None)
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module

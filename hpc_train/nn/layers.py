"""Layers with explicit forward and backward, on numpy or cupy arrays.

Images are NHWC (N, height, width, channels), the layout the HDF5 datasets store.
Every layer caches what its backward needs during forward; calling backward
without a forward before it is a programming error.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import xp_of
from .module import Module, Parameter, default_rng


def _init(xp, rng, shape, fan_in: int, dtype, gain: float = math.sqrt(2.0)):
    """He-uniform weights (drawn on the host so that every backend gets the same numbers)."""
    bound = gain * math.sqrt(3.0 / fan_in)
    return xp.asarray(rng.uniform(-bound, bound, size=shape).astype(dtype))


class Linear(Module):
    """y = x @ weight + bias. A large weight gradient is computed in row blocks of about
    STREAM_BYTES, each announced as soon as it is final, so that its reduction can start
    while the rest is still being computed (the first layer's gradient is both the
    largest and the last one backward produces)."""

    STREAM_BYTES = 1 << 20

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, rng=0,
                 dtype=np.float32, xp=np):
        rng = default_rng(rng)
        self.weight = Parameter(_init(xp, rng, (in_features, out_features), in_features, dtype))
        self.bias = Parameter(xp.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x):
        self._x = x
        y = x @ self.weight.data
        if self.bias is not None:
            y += self.bias.data
        return y

    def backward(self, dy, input_grad=True):
        weight = self.weight
        fan_in, fan_out = weight.data.shape
        if self.grad_ready is None or weight.data.nbytes <= 2 * self.STREAM_BYTES:
            weight.accumulate_matmul(self._x.T, dy)
        else:
            rows = max(1, self.STREAM_BYTES // (fan_out * weight.data.itemsize))
            for lo in range(0, fan_in, rows):
                hi = min(fan_in, lo + rows)
                weight.accumulate_matmul(self._x[:, lo:hi].T, dy, rows=(lo, hi))
                self.grad_ready("weight", lo * fan_out, hi * fan_out)
        if self.bias is not None:
            self.bias.accumulate(dy.sum(axis=0))
        return dy @ self.weight.data.T if input_grad else None


class ReLU(Module):
    def forward(self, x):
        self._mask = x > 0
        return x * self._mask

    def backward(self, dy, input_grad=True):
        return dy * self._mask


class GELU(Module):
    """tanh approximation (Hendrycks & Gimpel), as in GPT-2 and PyTorch's approximate='tanh'."""

    _C = math.sqrt(2.0 / math.pi)

    def forward(self, x):
        xp = xp_of(x)
        self._x = x
        self._t = xp.tanh(self._C * (x + 0.044715 * x**3))
        return 0.5 * x * (1 + self._t)

    def backward(self, dy, input_grad=True):
        x, t = self._x, self._t
        dt = (1 - t * t) * self._C * (1 + 3 * 0.044715 * x * x)
        return dy * (0.5 * (1 + t) + 0.5 * x * dt)


class Flatten(Module):
    def forward(self, x):
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy, input_grad=True):
        return dy.reshape(self._shape)


class Dropout(Module):
    """Inverted dropout; masks come from the layer's own seeded generator (reproducible)."""

    def __init__(self, p: float = 0.5, *, rng=0):
        if not 0 <= p < 1:
            raise ValueError(f"Dropout p={p}: expected 0 <= p < 1")
        self.p = p
        self._rng = default_rng(rng)

    def forward(self, x):
        if not self.training or self.p == 0:
            self._mask = None
            return x
        xp = xp_of(x)
        keep = self._rng.random(x.shape) >= self.p
        self._mask = xp.asarray(keep.astype(x.dtype) / (1 - self.p))
        return x * self._mask

    def backward(self, dy, input_grad=True):
        return dy if self._mask is None else dy * self._mask


def _window_view(xp, x, k: int, stride: int):
    """(N, Ho, Wo, C, k, k) view of k x k windows of NHWC x at the given stride."""
    windows = xp.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    return windows[:, ::stride, ::stride]


class Conv2d(Module):
    """2-D convolution by im2col + one GEMM; NHWC; weight (in_channels * k * k, out_channels)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, bias: bool = True, rng=0, dtype=np.float32, xp=np):
        rng = default_rng(rng)
        self.k, self.stride, self.padding = kernel_size, stride, padding
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = Parameter(_init(xp, rng, (fan_in, out_channels), fan_in, dtype))
        self.bias = Parameter(xp.zeros(out_channels, dtype=dtype)) if bias else None

    def forward(self, x):
        xp = xp_of(x)
        p = self.padding
        if p:
            x = xp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        self._padded_shape = x.shape
        windows = _window_view(xp, x, self.k, self.stride)
        n, ho, wo = windows.shape[:3]
        self._cols = windows.reshape(n * ho * wo, -1)  # copies: (C, kh, kw) order per row
        y = self._cols @ self.weight.data
        if self.bias is not None:
            y += self.bias.data
        return y.reshape(n, ho, wo, -1)

    def backward(self, dy, input_grad=True):
        xp = xp_of(dy)
        n, ho, wo, out_channels = dy.shape
        dy2 = dy.reshape(-1, out_channels)
        self.weight.accumulate_matmul(self._cols.T, dy2)
        if self.bias is not None:
            self.bias.accumulate(dy2.sum(axis=0))
        if not input_grad:
            return None
        k, s, p = self.k, self.stride, self.padding
        dcols = (dy2 @ self.weight.data.T).reshape(n, ho, wo, -1, k, k)
        dx = xp.zeros(self._padded_shape, dtype=dy.dtype)
        for i in range(k):  # col2im: k*k strided adds instead of a scatter
            for j in range(k):
                dx[:, i : i + s * ho : s, j : j + s * wo : s, :] += dcols[..., i, j]
        if p:
            dx = dx[:, p:-p, p:-p, :]
        return dx


class MaxPool2d(Module):
    """Max over k x k windows (stride defaults to k); gradient to the first maximum of each window."""

    def __init__(self, kernel_size: int, stride: int | None = None):
        self.k, self.stride = kernel_size, stride or kernel_size

    def forward(self, x):
        xp = xp_of(x)
        windows = _window_view(xp, x, self.k, self.stride)
        flat = windows.reshape(*windows.shape[:4], -1)
        self._argmax = flat.argmax(axis=-1)
        self._shape = x.shape
        return xp.take_along_axis(flat, self._argmax[..., None], axis=-1)[..., 0]

    def backward(self, dy, input_grad=True):
        xp = xp_of(dy)
        k, s = self.k, self.stride
        ho, wo = dy.shape[1:3]
        dx = xp.zeros(self._shape, dtype=dy.dtype)
        for i in range(k):
            for j in range(k):
                hit = self._argmax == i * k + j
                dx[:, i : i + s * ho : s, j : j + s * wo : s, :] += dy * hit
        return dx


class _Normalization(Module):
    """Shared by BatchNorm and LayerNorm: y = xhat * weight + bias, xhat = (x - mean) / std."""

    def __init__(self, features: int, eps: float, dtype, xp):
        self.eps = eps
        self.weight = Parameter(xp.ones(features, dtype=dtype))
        self.bias = Parameter(xp.zeros(features, dtype=dtype))

    def _normalize(self, x, mean, var):
        self._inv_std = 1 / (var + self.eps) ** 0.5
        self._xhat = (x - mean) * self._inv_std
        return self._xhat * self.weight.data + self.bias.data

    def _affine_backward(self, dy):
        """Accumulate weight and bias gradients; return d loss / d xhat."""
        axes = tuple(range(dy.ndim - 1))
        self.weight.accumulate((dy * self._xhat).sum(axis=axes))
        self.bias.accumulate(dy.sum(axis=axes))
        return dy * self.weight.data


class BatchNorm(_Normalization):
    """Batch normalization over every axis but the last (features / channels).

    With `sync=True` the batch statistics, and in backward their gradients, are
    summed over all ranks (SyncBatchNorm): every rank normalizes with the global
    batch's mean and variance.
    """

    def __init__(self, features: int, *, momentum: float = 0.1, eps: float = 1e-5, sync: bool = False,
                 dtype=np.float32, xp=np):
        super().__init__(features, eps, dtype, xp)
        self.momentum, self.sync = momentum, sync
        self.running_mean = xp.zeros(features, dtype=dtype)
        self.running_var = xp.ones(features, dtype=dtype)

    def _sum_over_batch(self, columns: list):
        """Sums over the local batch, then over all ranks when synchronized."""
        xp = xp_of(columns[0])
        local = xp.stack(columns)
        if self.sync:
            from ..comm import allreduce

            local = allreduce(local, name="batchnorm")
        return local

    def forward(self, x):
        axes = tuple(range(x.ndim - 1))
        count = x.size // x.shape[-1]
        if self.training:
            xp = xp_of(x)
            sums = self._sum_over_batch([x.sum(axis=axes), (x * x).sum(axis=axes),
                                         xp.full(x.shape[-1], count, dtype=x.dtype)])
            total = sums[2]
            mean = sums[0] / total
            var = xp.maximum(sums[1] / total - mean * mean, 0)
            self.running_mean += self.momentum * (mean - self.running_mean)
            self.running_var += self.momentum * (var * total / xp.maximum(total - 1, 1) - self.running_var)
            self._count = total
        else:
            mean, var = self.running_mean, self.running_var
        return self._normalize(x, mean, var)

    def backward(self, dy, input_grad=True):
        g = self._affine_backward(dy)
        if not self.training:
            return g * self._inv_std
        axes = tuple(range(dy.ndim - 1))
        xhat = self._xhat
        sums = self._sum_over_batch([g.sum(axis=axes), (g * xhat).sum(axis=axes)])
        n = self._count
        return self._inv_std * (g - sums[0] / n - xhat * (sums[1] / n))


class LayerNorm(_Normalization):
    """Normalization over the last axis with a learned scale and shift."""

    def __init__(self, features: int, *, eps: float = 1e-5, dtype=np.float32, xp=np):
        super().__init__(features, eps, dtype, xp)

    def forward(self, x):
        return self._normalize(x, x.mean(axis=-1, keepdims=True), x.var(axis=-1, keepdims=True))

    def backward(self, dy, input_grad=True):
        g = self._affine_backward(dy)
        xhat = self._xhat
        return self._inv_std * (g - g.mean(axis=-1, keepdims=True)
                                - xhat * (g * xhat).mean(axis=-1, keepdims=True))


class Embedding(Module):
    """Rows of a table by integer index; gradients scatter-added back to the rows used."""

    def __init__(self, num_embeddings: int, dim: int, *, rng=0, dtype=np.float32, xp=np):
        rng = default_rng(rng)
        self.num_embeddings = num_embeddings
        self.weight = Parameter(xp.asarray(rng.normal(0, 1, (num_embeddings, dim)).astype(dtype)))

    def forward(self, idx):
        xp = xp_of(idx)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"Embedding expects integer indices, got {idx.dtype}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.num_embeddings):
            raise IndexError(f"Embedding index out of range [0, {self.num_embeddings}): "
                             f"min {int(idx.min())}, max {int(idx.max())}")
        self._idx = idx
        return xp.take(self.weight.data, idx, axis=0)

    def backward(self, dy, input_grad=True):
        xp = xp_of(dy)
        flat = dy.reshape(-1, dy.shape[-1])
        self.weight.materialize()
        xp.add.at(self.weight.grad, self._idx.reshape(-1), flat)
        return None  # indices have no gradient

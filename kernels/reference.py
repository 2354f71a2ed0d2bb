"""NumPy references of every kernel, written with array operations only so that they run on
any xp (NumPy, or CuPy where a kernel does not apply). The CPU path uses these; the tests
check the host build of the CUDA element functions against them."""

from __future__ import annotations

import numpy as np


def sgd(w, grad, buf, lr, momentum, weight_decay, nesterov, first) -> None:
    """PyTorch's SGD in place (buf may be None when momentum is 0)."""
    g = grad + weight_decay * w if weight_decay else grad
    if momentum:
        if first:
            buf[...] = g
        else:
            buf *= momentum
            buf += g
        g = g + momentum * buf if nesterov else buf
    w -= lr * g


def adam(w, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step) -> None:
    """Adam / AdamW with bias correction in place; step counts from 1."""
    g = grad
    if weight_decay and not decoupled:
        g = g + weight_decay * w
    if weight_decay and decoupled:
        w *= 1 - lr * weight_decay
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * g * g
    step_size = lr / (1 - beta1**step)
    denom = np.sqrt(v / (1 - beta2**step)) + eps
    w -= step_size * m / denom


def pack(src, dst, scale: float) -> None:
    """dst (float16 or bfloat16) = src * scale, rounded to nearest even; overflow gives inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        np.multiply(src, np.float32(scale), out=dst, casting="unsafe")


def unpack(src, dst, scale: float) -> None:
    """dst (float32) = src * scale."""
    np.multiply(src.astype(np.float32), np.float32(scale), out=dst)


def bucket_pack(arrays, out) -> None:
    """The arrays, flattened, one after the other in out."""
    offset = 0
    for a in arrays:
        out[offset : offset + a.size] = a.reshape(-1)
        offset += a.size


def bucket_unpack(flat, arrays) -> None:
    offset = 0
    for a in arrays:
        a[...] = flat[offset : offset + a.size].reshape(a.shape)
        offset += a.size


def elementwise_sum(a, b, out) -> None:
    np.add(a, b, out=out)

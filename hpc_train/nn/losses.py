"""Softmax cross-entropy, computed stably (log-sum-exp with the row maximum subtracted)."""

from __future__ import annotations

from ..backend import xp_of


class SoftmaxCrossEntropy:
    """Mean negative log-likelihood of integer labels under softmax(logits).

    `forward(logits, labels)` returns the loss as a 0-d array; `backward()` returns
    d loss / d logits. `scale` lets data-parallel training divide by the global
    batch instead of the local one.
    """

    def forward(self, logits, labels, scale: float | None = None):
        xp = xp_of(logits)
        n, classes = logits.shape
        if labels.shape != (n,):
            raise ValueError(f"labels shape {labels.shape} does not match logits {logits.shape}")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(f"labels must lie in [0, {classes}); got min {int(labels.min())}, "
                             f"max {int(labels.max())}")
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_norm = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        log_probs = shifted - log_norm
        self._probs = xp.exp(log_probs)
        self._labels = labels
        self._scale = 1.0 / n if scale is None else scale
        return -log_probs[xp.arange(n), labels].sum() * self._scale

    def backward(self):
        xp = xp_of(self._probs)
        grad = self._probs.copy()
        grad[xp.arange(grad.shape[0]), self._labels] -= 1
        grad *= grad.dtype.type(self._scale)
        return grad


def accuracy(logits, labels) -> float:
    """Fraction of rows whose largest logit is the label."""
    return float((logits.argmax(axis=1) == labels).mean()) if labels.size else 0.0

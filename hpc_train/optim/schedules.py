"""Learning-rate schedules: callables from the step number (0-based) to a learning rate."""

from __future__ import annotations

import math


def constant(lr: float):
    return lambda step: lr


def warmup_cosine(base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0):
    """Linear warm-up from ~0 to base_lr, then cosine decay to min_lr at total_steps."""
    if total_steps <= warmup_steps:
        raise ValueError(f"warmup_cosine: total_steps {total_steps} must exceed warmup_steps {warmup_steps}")

    def lr(step: int) -> float:
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))

    return lr


def warmup_step(base_lr: float, step_size: int, gamma: float = 0.1, warmup_steps: int = 0):
    """Linear warm-up, then multiply by gamma every step_size steps."""
    if step_size <= 0:
        raise ValueError(f"warmup_step: step_size must be positive, got {step_size}")

    def lr(step: int) -> float:
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        return base_lr * gamma ** ((step - warmup_steps) // step_size)

    return lr


def linear_scaling(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Goyal et al.'s rule: scale the learning rate with the global batch size."""
    return base_lr * global_batch / reference_batch

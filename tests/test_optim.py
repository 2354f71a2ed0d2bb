"""Optimizers and schedules against hand-computed references (serial)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpc_train import nn, optim


def one_param(value, grad):
    p = nn.Parameter(np.array(value, dtype=np.float64))
    p.grad[...] = grad
    return {"w": p}


def test_sgd_momentum_nesterov_weight_decay():
    params = one_param([1.0], [0.5])
    opt = optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    opt.step()  # g = 0.5 + 0.1*1 = 0.6; buf = 0.6; update = g + 0.9*buf = 1.14
    assert params["w"].data[0] == pytest.approx(1 - 0.1 * 1.14)
    opt.step()  # w = 0.886; g = 0.5 + 0.0886; buf = 0.9*0.6 + g; update = g + 0.9*buf
    g = 0.5 + 0.1 * 0.886
    buf = 0.9 * 0.6 + g
    assert params["w"].data[0] == pytest.approx(0.886 - 0.1 * (g + 0.9 * buf))
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(params, lr=0.1, nesterov=True)


def test_adam_first_steps_and_adamw():
    params = one_param([1.0], [0.5])
    opt = optim.Adam(params, lr=0.01)
    opt.step()  # bias-corrected first step moves by lr * sign(g)
    assert params["w"].data[0] == pytest.approx(1 - 0.01, rel=1e-6)
    decoupled = one_param([1.0], [0.0])
    optim.AdamW(decoupled, lr=0.1, weight_decay=0.5).step()
    assert decoupled["w"].data[0] == pytest.approx(1 - 0.1 * 0.5)
    assert set(opt.state_arrays()) == {"w/exp_avg", "w/exp_avg_sq"}


def test_schedules():
    cosine = optim.warmup_cosine(1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert cosine(110) == pytest.approx(0.1) and cosine(500) == pytest.approx(0.1)
    step = optim.warmup_step(1.0, step_size=10, gamma=0.5, warmup_steps=2)
    assert [step(s) for s in (0, 1, 2, 11, 12, 22)] == [0.5, 1.0, 1.0, 1.0, 0.5, 0.25]
    assert optim.linear_scaling(0.1, global_batch=1024) == pytest.approx(0.4)
    opt = optim.SGD(one_param([1.0], [1.0]), lr=step)
    assert opt.lr == 0.5
    with pytest.raises(ValueError, match="total_steps"):
        optim.warmup_cosine(1.0, total_steps=5, warmup_steps=5)


def test_sgd_trains_a_model():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int64)
    model = nn.mlp((8, 16, 2), seed=1)
    opt = optim.SGD(model, lr=0.5, momentum=0.9)
    loss = nn.SoftmaxCrossEntropy()
    for _ in range(50):
        opt.zero_grad()
        loss.forward(model(x), labels)
        model.backward(loss.backward())
        opt.step()
    assert nn.accuracy(model(x), labels) > 0.95


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", [
    lambda p, fused: optim.SGD(p, lr=0.1, fused=fused),
    lambda p, fused: optim.SGD(p, lr=0.1, weight_decay=0.01, fused=fused),
    lambda p, fused: optim.SGD(p, lr=0.1, momentum=0.9, fused=fused),
    lambda p, fused: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, fused=fused),
    lambda p, fused: optim.Adam(p, lr=0.01, fused=fused),
    lambda p, fused: optim.Adam(p, lr=0.01, weight_decay=0.1, fused=fused),
    lambda p, fused: optim.AdamW(p, lr=0.01, weight_decay=0.1, fused=fused),
], ids=["sgd", "sgd-wd", "momentum", "nesterov-wd", "adam", "adam-l2", "adamw"])
def test_fused_updates_match_the_numpy_reference(make, dtype):
    from hpc_train import native

    if native.load("hpc_train.optim", "fused.c", "_fused") is None:
        pytest.skip("no C compiler: the NumPy reference is the only path")
    rng = np.random.default_rng(0)
    start = rng.standard_normal(1001).astype(dtype)
    runs = []
    for fused in (True, False):
        grads = np.random.default_rng(1)
        p = nn.Parameter(start.copy())
        opt = make({"w": p}, fused)
        for step in range(4):
            p.grad[...] = grads.standard_normal(1001).astype(dtype) if step else start * 0.5
            opt.step()
        runs.append(p.data)
    np.testing.assert_allclose(runs[0], runs[1], rtol=4 * np.finfo(dtype).eps, atol=4 * np.finfo(dtype).eps)

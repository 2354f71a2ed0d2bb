"""Finite-difference gradient checks (float64) for every layer and the loss, plus determinism."""

from __future__ import annotations

import numpy as np
import pytest

from hpc_train import nn

F64 = np.float64


def numeric_vs_analytic(forward, backward, arrays, rng, samples=12, eps=1e-6):
    """Compare d(sum(forward() * R))/d(array) by central differences with the analytic gradients.

    `backward(R)` must return the analytic gradients of `arrays`, in order.
    """
    out = forward()
    weights = rng.standard_normal(out.shape)
    analytic = backward(weights)
    for array, grad in zip(arrays, analytic, strict=True):
        flat = array.reshape(-1)
        for index in rng.choice(flat.size, size=min(samples, flat.size), replace=False):
            saved = flat[index]
            flat[index] = saved + eps
            up = float((forward() * weights).sum())
            flat[index] = saved - eps
            down = float((forward() * weights).sum())
            flat[index] = saved
            numeric = (up - down) / (2 * eps)
            assert grad.reshape(-1)[index] == pytest.approx(numeric, rel=1e-5, abs=1e-7)


def check_layer(layer, x, rng, reset=lambda: None, input_grad=True):
    params = list(layer.named_parameters().values())

    def forward():
        reset()
        return layer.forward(x)

    def backward(weights):
        layer.zero_grad()
        reset()
        layer.forward(x)
        dx = layer.backward(weights, input_grad=True)
        return ([dx] if input_grad else []) + [p.grad.copy() for p in params]

    numeric_vs_analytic(forward, backward, ([x] if input_grad else []) + [p.data for p in params], rng)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_linear(rng):
    check_layer(nn.Linear(7, 5, rng=1, dtype=F64), rng.standard_normal((4, 7)), rng)


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1), (2, 0)])
def test_conv2d(rng, stride, padding):
    layer = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, rng=1, dtype=F64)
    check_layer(layer, rng.standard_normal((2, 7, 6, 3)), rng)


def test_conv2d_matches_direct_convolution(rng):
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=1, rng=1, dtype=F64)
    x = rng.standard_normal((1, 5, 5, 2))
    y = layer(x)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    w = layer.weight.data.reshape(2, 3, 3, 3)  # (C, kh, kw, out)
    for i in range(y.shape[1]):
        for j in range(y.shape[2]):
            patch = padded[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]  # (kh, kw, C)
            expected = np.einsum("hwc,chwo->o", patch, w) + layer.bias.data
            np.testing.assert_allclose(y[0, i, j], expected, rtol=1e-12)


@pytest.mark.parametrize("k, stride", [(2, None), (3, 2), (2, 1)])
def test_maxpool(rng, k, stride):
    check_layer(nn.MaxPool2d(k, stride), rng.standard_normal((2, 6, 7, 3)), rng)


@pytest.mark.parametrize("layer", [nn.ReLU(), nn.GELU(), nn.Flatten()], ids=["relu", "gelu", "flatten"])
def test_elementwise(rng, layer):
    check_layer(layer, rng.standard_normal((3, 4, 5)), rng)


def test_gelu_values():
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    expected = [-0.0036373920817729943, -0.15880800939172324, 0.0, 0.34571400982514394,
                1.9545976940871754]  # PyTorch gelu(approximate="tanh")
    np.testing.assert_allclose(nn.GELU()(x), expected, rtol=1e-12)


def test_dropout(rng):
    layer = nn.Dropout(0.3, rng=7)
    x = rng.standard_normal((50, 40))

    def reset():
        layer._rng = np.random.default_rng(7)

    check_layer(layer, x, rng, reset=reset)
    reset()
    y = layer(x)
    dropped = np.mean(y == 0)
    assert 0.25 < dropped < 0.35
    np.testing.assert_allclose(y[y != 0], x[y != 0] / 0.7)
    assert nn.Dropout(0.3, rng=7).eval()(x) is x


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5, 4)], ids=["features", "nhwc"])
def test_batchnorm(rng, shape):
    layer = nn.BatchNorm(4, dtype=F64)
    layer.weight.data[:] = rng.standard_normal(4)
    layer.bias.data[:] = rng.standard_normal(4)
    check_layer(layer, rng.standard_normal(shape) * 3 + 1, rng)
    y = layer(rng.standard_normal(shape) * 3 + 1)
    assert y.shape == shape
    layer.eval()
    check_layer(layer, rng.standard_normal(shape), rng)


def test_batchnorm_statistics():
    layer = nn.BatchNorm(2, momentum=1.0, dtype=F64)
    x = np.array([[1.0, 10.0], [3.0, 30.0]])
    y = layer(x)
    np.testing.assert_allclose(y, [[-1, -1], [1, 1]], atol=1e-5)
    np.testing.assert_allclose(layer.running_mean, [2.0, 20.0])
    np.testing.assert_allclose(layer.running_var, [2.0, 200.0])  # unbiased


def test_layernorm(rng):
    layer = nn.LayerNorm(6, dtype=F64)
    layer.weight.data[:] = rng.standard_normal(6)
    layer.bias.data[:] = rng.standard_normal(6)
    check_layer(layer, rng.standard_normal((3, 2, 6)), rng)


def test_embedding(rng):
    layer = nn.Embedding(10, 4, rng=1, dtype=F64)
    idx = np.array([[1, 3, 3], [9, 0, 1]])
    check_layer(layer, idx, rng, input_grad=False)
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        layer(np.array([10]))


def test_softmax_cross_entropy(rng):
    loss = nn.SoftmaxCrossEntropy()
    logits = rng.standard_normal((5, 4)) * 10
    labels = np.array([0, 3, 1, 1, 2])

    numeric_vs_analytic(lambda: np.asarray(loss.forward(logits, labels)),
                        lambda w: [(loss.forward(logits, labels), loss.backward() * w)[1]], [logits], rng)
    huge = np.array([[1000.0, -1000.0]])
    assert np.isfinite(loss.forward(huge, np.array([1])))  # stable for extreme logits
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        loss.forward(logits, np.array([0, 4, 1, 1, 2]))


def test_cnn_end_to_end_gradients(rng):
    model = nn.cnn(channels=(2, 3), hidden=5, classes=3, input_shape=(8, 8, 2), batchnorm=True, seed=3,
                   dtype=F64)
    x = rng.standard_normal((2, 8, 8, 2))
    check_layer(model, x, rng)


def test_sequential_names_and_hook_order():
    model = nn.mlp((6, 5, 4, 3), seed=0)
    names = list(model.named_parameters())
    assert names == ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    seen = []
    model.register_grad_hook(lambda name, p, start, stop: seen.append(name))
    out = model(np.ones((2, 6), np.float32))
    assert model.backward(np.ones_like(out)) is None  # the input gradient only when asked for
    assert seen == ["5.weight", "5.bias", "3.weight", "3.bias", "1.weight", "1.bias"]


def test_large_linear_gradient_streams_in_row_blocks(rng):
    model = nn.mlp((64, 8192, 3), seed=0)  # 64 x 8192 float32 weight: 2 MiB, over the streaming cut
    nn.Linear.STREAM_BYTES, saved = 128 << 10, nn.Linear.STREAM_BYTES
    try:
        pieces = []
        model.register_grad_hook(lambda name, p, start, stop: pieces.append((name, start, stop)))
        x = rng.standard_normal((5, 64)).astype(np.float32)
        model.zero_grad()
        out = model(x)
        model.backward(np.ones_like(out))
    finally:
        nn.Linear.STREAM_BYTES = saved
    first = [(a, b) for name, a, b in pieces if name == "1.weight"]
    assert len(first) == 16 and first[0] == (0, 4 * 8192) and first[-1][1] == 64 * 8192
    assert all(b == c for (_, b), (c, _) in zip(first, first[1:], strict=False))  # contiguous, in order
    reference = nn.mlp((64, 8192, 3), seed=0)
    out = reference(x)
    reference.backward(np.ones_like(out))
    np.testing.assert_array_equal(model.layers[1].weight.grad, reference.layers[1].weight.grad)


def test_reference_models_sizes():
    assert 500_000 <= nn.cnn().num_parameters() <= 2_000_000
    assert nn.mlp((3072, 1024, 512, 10)).num_parameters() == 3072 * 1024 + 1024 + 1024 * 512 + 512 + 5130
    assert nn.cnn()(np.zeros((2, 32, 32, 3), np.float32)).dtype == np.float32


@pytest.mark.parametrize("widths", [(3072, 1024, 512, 10), (8, 4), (5, 7, 3, 2)])
def test_mlp_parameter_count_without_building_equals_the_built_model(widths):
    assert nn.mlp_parameters(widths) == nn.mlp(widths).num_parameters()


@pytest.mark.parametrize("channels, hidden, classes, shape, batchnorm", [
    ((32, 64, 128), 256, 10, (32, 32, 3), False), ((4, 8), 16, 3, (28, 20, 1), True), ((5,), 7, 2, (9, 9, 2), True)])
def test_cnn_parameter_count_without_building_equals_the_built_model(channels, hidden, classes, shape, batchnorm):
    model = nn.cnn(channels, hidden, classes, input_shape=shape, batchnorm=batchnorm)
    statistics = sum(layer.running_mean.size + layer.running_var.size for layer in model.layers
                     if isinstance(layer, nn.BatchNorm))
    assert nn.cnn_parameters(channels, hidden, classes, input_shape=shape, batchnorm=batchnorm) == \
        model.num_parameters() + statistics
    assert model(np.zeros((2, *shape), np.float32)).shape == (2, classes)


@pytest.mark.parametrize("build", [lambda: nn.cnn(channels=(4, 8), hidden=16, seed=11),
                                   lambda: nn.mlp((3072, 64, 10), dropout=0.2, seed=11)],
                         ids=["cnn", "mlp-dropout"])
def test_same_seed_same_result_bit_for_bit(build):
    def run():
        model = build()
        data = np.random.default_rng(5)
        loss = nn.SoftmaxCrossEntropy()
        for _ in range(3):
            x = data.standard_normal((4, 32, 32, 3)).astype(np.float32)
            y = data.integers(0, 10, 4)
            model.zero_grad()
            loss.forward(model(x), y)
            model.backward(loss.backward())
            for p in model.parameters():
                p.data -= 0.01 * p.grad
        return [p.data.copy() for p in model.parameters()]

    for a, b in zip(run(), run(), strict=True):
        assert a.tobytes() == b.tobytes()

"""CUDA kernels: every .cu compiles to PTX; the host build of their element functions equals the
NumPy references (NaN, Inf, fp16 overflow and subnormals included); GPU runs where a GPU is."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hpc_train.kernels import host, reference

from hpc_train import kernels

KERNELS = Path(kernels.__file__).resolve().parent
NVCC = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)
ENTRIES = ("sgd_f32", "adam_f32", "pack_f16", "unpack_f16", "pack_bf16", "unpack_bf16", "bucket_pack_f32",
           "bucket_unpack_f32", "sum_f32")
F32P, U16P = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint16)
F, INT, N = ctypes.c_float, ctypes.c_int, ctypes.c_longlong
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and Inf inputs, on purpose


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit absent)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(p.name for p in KERNELS.glob("*.cu")))
def test_every_cu_compiles_to_ptx(tmp_path, arch, source):
    out = tmp_path / f"{source}.{arch}.ptx"
    result = subprocess.run([NVCC, "-ptx", f"-arch={arch}", "-I", str(KERNELS), str(KERNELS / source),
                             "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ptx = out.read_text()
    assert f".target {arch}" in ptx
    for entry in ENTRIES:
        assert f".entry {entry}(" in ptx, entry


@pytest.fixture(scope="module")
def lib():
    try:
        library = host.library()
    except host.HostBuildError as exc:
        pytest.skip(str(exc))
    library.sgd_f32.argtypes = [F32P, F32P, F32P, N, F, F, F, INT, INT]
    library.adam_f32.argtypes = [F32P, F32P, F32P, F32P, N, F, F, F, F, F, F, F, F, F]
    for name in ("pack_f16", "pack_bf16"):
        getattr(library, name).argtypes = [F32P, U16P, N, F]
    for name in ("unpack_f16", "unpack_bf16"):
        getattr(library, name).argtypes = [U16P, F32P, N, F]
    library.bucket_pack_f32.argtypes = [ctypes.POINTER(F32P), ctypes.POINTER(N), INT, F32P]
    library.bucket_unpack_f32.argtypes = [F32P, ctypes.POINTER(F32P), ctypes.POINTER(N), INT]
    library.sum_f32.argtypes = [F32P, F32P, F32P, N]
    return library


def ptr(a, kind=F32P):
    return a.ctypes.data_as(kind)


def awkward_floats(n: int, seed: int) -> np.ndarray:
    """Normal, huge, tiny (fp16 subnormal), exact fp16 ties, NaN, +-Inf and signed zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32) * np.float32(10.0) ** rng.integers(-9, 6, n).astype(np.float32)
    special = [np.nan, np.inf, -np.inf, 0.0, -0.0, 65504.0, 65519.99, 65520.0, -70000.0, 2.0**-24, 2.0**-25,
               3 * 2.0**-26, 5.960464477539063e-08, 6.103515625e-05, 1.0009765625 + 2.0**-11, 2049.0, 3.4e38]
    x[: len(special)] = np.array(special, np.float32)
    ties = rng.integers(0, 1 << 16, n // 4).astype(np.uint32) << np.uint32(13) | np.uint32(0x1000)
    x[len(special) : len(special) + ties.size] = ties.view(np.float32)  # exactly halfway between two halves
    return x


def assert_same_bits_or_both_nan(a, b):
    a16, b16 = a.view(np.uint16), b.view(np.uint16)
    nan_a, nan_b = np.isnan(a.astype(np.float32)), np.isnan(b.astype(np.float32))
    np.testing.assert_array_equal(nan_a, nan_b)
    np.testing.assert_array_equal(a16[~nan_a], b16[~nan_b])


@pytest.mark.parametrize("scale", [1.0, 1 / 3, 1024.0])
def test_fp16_pack_and_unpack_match_the_reference(lib, scale):
    x = awkward_floats(20000, 1)
    mine, expected = np.empty(x.size, np.float16), np.empty(x.size, np.float16)
    lib.pack_f16(ptr(x), ptr(mine, U16P), x.size, scale)
    reference.pack(x, expected, scale)
    assert_same_bits_or_both_nan(mine, expected)
    assert np.isinf(expected).sum() > 10  # overflow was exercised
    back, back_expected = np.empty(x.size, np.float32), np.empty(x.size, np.float32)
    lib.unpack_f16(ptr(expected, U16P), ptr(back), x.size, 1 / scale)
    reference.unpack(expected, back_expected, 1 / scale)
    np.testing.assert_array_equal(back, back_expected)  # NaN == NaN for assert_array_equal


def test_bf16_pack_and_unpack_match_the_reference(lib):
    bfloat16 = pytest.importorskip("ml_dtypes").bfloat16
    x = awkward_floats(20000, 2)
    mine, expected = np.empty(x.size, bfloat16), np.empty(x.size, bfloat16)
    lib.pack_bf16(ptr(x), ptr(mine, U16P), x.size, 0.5)
    reference.pack(x, expected, 0.5)
    assert_same_bits_or_both_nan(mine, expected)
    back, back_expected = np.empty(x.size, np.float32), np.empty(x.size, np.float32)
    lib.unpack_bf16(ptr(expected, U16P), ptr(back), x.size, 2.0)
    reference.unpack(expected, back_expected, 2.0)
    np.testing.assert_array_equal(back, back_expected)


def ulps(a, b):
    """Distance in units in the last place (float32), 0 where both are NaN or equal infinities."""
    ia, ib = a.view(np.int32).astype(np.int64), b.view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, np.int64(-(1 << 31)) - ia, ia)
    ib = np.where(ib < 0, np.int64(-(1 << 31)) - ib, ib)
    distance = np.abs(ia - ib)
    return np.where(np.isnan(a) & np.isnan(b), 0, distance)


def optimizer_inputs(n, seed):
    rng = np.random.default_rng(seed)
    w, g, m = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    v = np.abs(rng.standard_normal(n)).astype(np.float32)
    g[:4] = [np.nan, np.inf, -np.inf, 1e30]
    return w, g, m, v


@pytest.mark.parametrize("momentum, nesterov, weight_decay, first", [
    (0.0, False, 0.0, False), (0.9, False, 1e-4, True), (0.9, False, 1e-4, False), (0.9, True, 0.01, False)])
def test_sgd_element_matches_the_reference(lib, momentum, nesterov, weight_decay, first):
    w, g, buf, _ = optimizer_inputs(4096, 3)
    w2, buf2 = w.copy(), buf.copy()
    lib.sgd_f32(ptr(w), ptr(g), ptr(buf), w.size, 0.1, momentum, weight_decay, nesterov, first)
    reference.sgd(w2, g, buf2 if momentum else None, 0.1, momentum, weight_decay, nesterov, first)
    assert ulps(w, w2).max() <= 4 and ulps(buf, buf2).max() <= 4
    assert np.isnan(w[0]) and np.isinf(w[1:3]).all()  # NaN and Inf gradients propagate


@pytest.mark.parametrize("weight_decay, decoupled", [(0.0, False), (0.01, False), (0.01, True)])
@pytest.mark.parametrize("step", [1, 7])
def test_adam_element_matches_the_reference(lib, weight_decay, decoupled, step):
    w, g, m, v = optimizer_inputs(4096, 4)
    w2, m2, v2 = w.copy(), m.copy(), v.copy()
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8
    lib.adam_f32(ptr(w), ptr(g), ptr(m), ptr(v), w.size,
                 *kernels.adam_constants(lr, b1, b2, eps, weight_decay, decoupled, step))
    reference.adam(w2, g, m2, v2, lr, b1, b2, eps, weight_decay, decoupled, step)
    for mine, expected in ((w, w2), (m, m2), (v, v2)):
        assert ulps(mine, expected).max() <= 4
    assert np.isnan(w[:3]).all()  # NaN and Inf gradients poison the weight on both sides


def test_bucket_pack_unpack_and_sum_match_the_reference(lib):
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in [(3, 4), (1,), (0,), (17,), (2, 2, 5)]]
    total = sum(a.size for a in arrays)
    table = (F32P * len(arrays))(*[ptr(a) for a in arrays])
    offsets = np.cumsum([0] + [a.size for a in arrays]).astype(np.int64)
    mine, expected = np.empty(total, np.float32), np.empty(total, np.float32)
    lib.bucket_pack_f32(table, offsets.ctypes.data_as(ctypes.POINTER(N)), len(arrays), ptr(mine))
    reference.bucket_pack(arrays, expected)
    np.testing.assert_array_equal(mine, expected)
    targets = [np.zeros_like(a) for a in arrays]
    table = (F32P * len(targets))(*[ptr(a) for a in targets])
    lib.bucket_unpack_f32(ptr(mine), table, offsets.ctypes.data_as(ctypes.POINTER(N)), len(targets))
    for a, t in zip(arrays, targets, strict=True):
        np.testing.assert_array_equal(a, t)
    a, b = awkward_floats(1000, 6), awkward_floats(1000, 7)
    out = np.empty(1000, np.float32)
    lib.sum_f32(ptr(a), ptr(b), ptr(out), a.size)
    with np.errstate(invalid="ignore", over="ignore"):
        np.testing.assert_array_equal(out, kernels.elementwise_sum(a, b))


def test_the_cpu_path_dispatches_to_the_references():
    w, g, m, v = optimizer_inputs(64, 8)
    w2, m2, v2 = w.copy(), m.copy(), v.copy()
    kernels.adam_update(w, g, m, v, 1e-3, 0.9, 0.999, 1e-8, step=3)
    reference.adam(w2, g, m2, v2, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 3)
    np.testing.assert_array_equal(w, w2)
    with pytest.raises(TypeError, match="wire dtype int32 is neither float16 nor bfloat16"):
        kernels._wire_kind(np.zeros(1, np.int32))


def gpu():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (GPU extra)")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        pytest.skip(f"no usable CUDA device: {exc}")
    return cupy


def test_device_kernels_match_the_references_on_a_gpu():
    cupy = gpu()
    w, g, m, v = optimizer_inputs(100_003, 9)
    dw, dg, dm, dv = (cupy.asarray(a) for a in (w, g, m, v))
    kernels.adam_update(dw, dg, dm, dv, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, 5)
    reference.adam(w, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, 5)
    assert ulps(cupy.asnumpy(dw), w).max() <= 4
    x = awkward_floats(100_003, 10)
    wire, expected = cupy.empty(x.size, cupy.float16), np.empty(x.size, np.float16)
    kernels.pack(cupy.asarray(x), wire, 0.25)
    reference.pack(x, expected, 0.25)
    assert_same_bits_or_both_nan(cupy.asnumpy(wire), expected)
    arrays = [cupy.arange(n, dtype=cupy.float32) for n in (5, 0, 1000, 3)]
    flat = cupy.empty(1008, cupy.float32)
    kernels.bucket_pack(arrays, flat)
    np.testing.assert_array_equal(cupy.asnumpy(flat), np.concatenate([cupy.asnumpy(a) for a in arrays]))

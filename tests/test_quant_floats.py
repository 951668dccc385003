"""F32/F16/BF16 kernels against gguf.quants and float64 numpy references."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from localmoe.quant import dequantize, matmul, matvec, quant_type

TYPES = [T.F32, T.F16, T.BF16]
EPS32 = 2.0 ** -24
# relative rounding error of x converted to the vec_dot type (fp16: 11 bits, bf16: 8 bits)
X_ROUNDING = {T.F32: 0.0, T.F16: 2.0 ** -11, T.BF16: 2.0 ** -8}


def all_bit_patterns(qt):
    """Every fp16/bf16 bit pattern (and random f32 ones) as raw bytes, 256 columns."""
    if qt == T.F32:
        bits = np.random.default_rng(0).integers(0, 2 ** 32, 65536, dtype=np.uint64).astype(np.uint32)
        bits[:6] = [0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001, 0x80000000, 0x00000001]
        return bits.view(np.uint8)
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.uint8)


def to_raw(w, qt):
    """f32 weights -> raw bytes of type qt (gguf's own converters)."""
    return gguf.quants.quantize(w, qt).view(np.uint8).reshape(w.shape[0], -1)


def random_weights(qt, n_rows, n_cols, rng):
    w = (rng.standard_normal((n_rows, n_cols)) * 0.1).astype(np.float32)
    special = np.float32([65504, -65504, 2 ** -24, -(2 ** -24), 2 ** -20, 0.0, -0.0, 1.0])
    mask = rng.random(w.shape) < 0.1
    w[mask] = rng.choice(special, mask.sum())
    return to_raw(w, qt)


def random_x(n, rng):
    x = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 100.0], n)).astype(np.float32)
    x[:3] = [0.0, -0.0, 1.0 + 2.0 ** -11]  # the last one is an fp16 tie: rounds to even (1.0)
    return x


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact(qt):
    raw = all_bit_patterns(qt)
    n_cols = 256
    got = dequantize(raw, qt, (raw.size // (n_cols * (4 if qt == T.F32 else 2)), n_cols))
    want = gguf.quants.dequantize(raw, qt)
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint32), want.reshape(-1).view(np.uint32))


def test_x_rounding_matches_ggml():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x[:4] = [65519.996, 65520.0, 2.0 ** -25, 1.0 + 2.0 ** -11]  # fp16: max, inf, tie to 0, tie to even
    with np.errstate(over="ignore"):
        h_ref = x.astype(np.float16).astype(np.float32)
    h = quant_type(T.F16).round_x(x)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(h[finite].view(np.uint32), h_ref[finite].view(np.uint32))
    assert np.isnan(h[~finite]).all()
    assert h[:4].tolist() == [65504.0, np.inf, 0.0, 1.0]
    b = quant_type(T.BF16).round_x(x)  # GGML_FP32_TO_BF16, NaN included (gguf copies it exactly)
    b_ref = gguf.quants.dequantize(gguf.quants.quantize(x, T.BF16), T.BF16)
    np.testing.assert_array_equal(b.view(np.uint32), b_ref.view(np.uint32))


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_matvec(qt):
    rng = np.random.default_rng(int(qt))
    for n_rows, n_cols in ((1, 16), (5, 96), (9, 1000)):
        raw = random_weights(qt, n_rows, n_cols, rng)
        x = random_x(n_cols, rng)
        y = matvec(raw, qt, (n_rows, n_cols), x).astype(np.float64)
        w = gguf.quants.dequantize(raw, qt).astype(np.float64)
        xr = quant_type(qt).round_x(x).astype(np.float64)
        mag = np.abs(w) @ np.abs(xr)
        # products of a rounded x and the weight are exact in float32; a sum of n terms
        # in any order is off by at most (n - 1) * eps * sum|terms|
        tol = n_cols * EPS32 * mag + 1e-37
        assert np.all(np.abs(y - w @ xr) <= tol), "vs rounded x"
        loose = X_ROUNDING[qt] * (np.abs(w) @ np.abs(x)) + tol
        assert np.all(np.abs(y - w @ x.astype(np.float64)) <= loose), "vs exact x"


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_matmul_rows_equal_matvec(qt):
    rng = np.random.default_rng(10 + int(qt))
    raw = random_weights(qt, 6, 80, rng)
    x = np.stack([random_x(80, rng) for _ in range(3)])
    y = matmul(raw, qt, (6, 80), x)
    for t in range(3):  # same row kernel: bit-identical
        np.testing.assert_array_equal(y[t], matvec(raw, qt, (6, 80), x[t]))


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_api_accepts_any_raw_shape(qt):
    rng = np.random.default_rng(5)
    raw = random_weights(qt, 6, 32, rng)
    x = random_x(32, rng)
    want = matvec(raw, qt, (6, 32), x)
    native = raw.view(np.float32 if qt == T.F32 else np.uint16)
    for r in (raw.reshape(-1), raw.reshape(2, 3, -1), native):
        np.testing.assert_array_equal(matvec(r, qt, (2, 3, 32), x), want)
        assert dequantize(r, qt, (2, 3, 32)).shape == (2, 3, 32)


def ggml_cpu():
    """llama-cpp-python's native ggml CPU library (the x86 kernels llama.cpp runs here)."""
    import ctypes
    import os

    import llama_cpp
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so"))
    lib.ggml_cpu_init()
    p, sz = ctypes.c_void_p, ctypes.c_size_t
    for name in ("ggml_cpu_fp32_to_fp16", "ggml_cpu_fp32_to_bf16"):
        getattr(lib, name).argtypes = [p, p, ctypes.c_int64]
    for name in ("ggml_vec_dot_f32", "ggml_vec_dot_f16", "ggml_vec_dot_bf16"):
        getattr(lib, name).argtypes = [ctypes.c_int, p, sz, p, sz, p, sz, ctypes.c_int]
    return lib


def ggml_round_x(lib, x, qt):
    """x converted by ggml's from_float for qt: (raw bits for vec_dot, the values as float32)."""
    if qt == T.F32:
        return x, x
    bits = np.zeros(x.size, np.uint16)
    getattr(lib, {T.F16: "ggml_cpu_fp32_to_fp16", T.BF16: "ggml_cpu_fp32_to_bf16"}[qt])(
        x.ctypes.data, bits.ctypes.data, x.size)
    return bits, gguf.quants.dequantize(bits.view(np.uint8), qt)


@pytest.mark.reference
@pytest.mark.parametrize("qt", [T.F16, T.BF16], ids=lambda t: t.name)
def test_x_rounding_matches_ggml_native(qt):
    lib = ggml_cpu()
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2 ** 32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    _, want = ggml_round_x(lib, x, qt)
    got = quant_type(qt).round_x(x)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), f"{(~same).sum()} values differ, e.g. x bits {x.view(np.uint32)[~same][:3]}"


@pytest.mark.reference
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_matvec_matches_ggml_vec_dot(qt):
    import ctypes
    lib = ggml_cpu()
    dot = getattr(lib, f"ggml_vec_dot_{qt.name.lower()}")
    rng = np.random.default_rng(30 + int(qt))
    n_rows, n_cols = 5, 1000
    raw = random_weights(qt, n_rows, n_cols, rng)
    x = random_x(n_cols, rng)
    xbits, xr = ggml_round_x(lib, x, qt)
    y = matvec(raw, qt, (n_rows, n_cols), x).astype(np.float64)
    mag = np.abs(gguf.quants.dequantize(raw, qt).astype(np.float64)) @ np.abs(xr.astype(np.float64))
    for r in range(n_rows):
        s = ctypes.c_float()
        dot(n_cols, ctypes.addressof(s), 0, raw[r].ctypes.data, 0, xbits.ctypes.data, 0, 1)
        tol = 2 * n_cols * EPS32 * mag[r] + 1e-37  # both within n_cols roundings of the exact sum
        assert abs(y[r] - s.value) <= tol, f"row {r}: ours {y[r]!r} ggml {s.value!r} tol {tol:.3g}"

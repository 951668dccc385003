"""Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 kernels and the Q8_0/Q8_1 activation quantizer.

References are independent numpy code: gguf.quants for weights, and a numpy
transcription of ggml's x86 quantize_row_q8_0/q8_1 for activations.
"""
import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from localmoe.quant import dequantize, matmul, matvec, quant_type
from localmoe.quant.q8 import quantize_activations

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
HAS_MIN = {T.Q4_1, T.Q5_1}
EPS32 = 2.0 ** -24  # float32 unit roundoff
# fp16 scales worth hitting: extremes, subnormals, signed zeros
SPECIAL = np.array([65504, -65504, 2 ** -24, -(2 ** -24), 2 ** -14, 3e-5, 0.0, -0.0, 1.0], np.float16)


def random_weights(qt, n_rows, n_blocks, rng, nan_scales=False):
    """u8[n_rows, row_bytes]: random quants; scales (and mins) mix SPECIAL and ordinary values.

    Row 0 block 0 is all-zero bytes. With nan_scales the scale bytes stay fully random (inf/NaN too).
    """
    ts = GGML_QUANT_SIZES[qt][1]
    raw = rng.integers(0, 256, (n_rows, n_blocks, ts), dtype=np.uint8)
    if not nan_scales:
        for off in (0, 2) if qt in HAS_MIN else (0,):
            d = (rng.standard_normal((n_rows, n_blocks)) * 0.05).astype(np.float16)
            special = rng.random((n_rows, n_blocks)) < 0.3
            d[special] = rng.choice(SPECIAL, special.sum())
            raw[:, :, off:off + 2] = d.view(np.uint8).reshape(n_rows, n_blocks, 2)
    raw[0, 0] = 0
    return raw.reshape(n_rows, n_blocks * ts)


def random_x(n, rng):
    """f32[n] with blocks of different magnitudes, one all-zero block, and exact .5 ties.

    Magnitudes stay below ~2000 so that the fp16 s = d*sum(q) does not overflow (it does in ggml too).
    """
    x = rng.standard_normal(n).astype(np.float32)
    x *= np.repeat(rng.choice(np.float32([1e-3, 1.0, 30.0, 300.0]), n // 32), 32)
    x[:32] = np.float32([127] + [2.5, -3.5, 0.5] * 10 + [0])  # id == 1: q = round-half-even(x)
    if n > 64:
        x[32:64] = 0
    return x


def ref_q8(x):
    """ggml x86 quantize_row_q8_1: q, d=fp16(amax/127), s=fp16(d*sum q); float32 math like the C code."""
    xb = x.reshape(-1, 32)
    amax = np.abs(xb).max(axis=1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        mul = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * mul[:, None]).astype(np.int64)
    s = (d * q.sum(axis=1).astype(np.float32)).astype(np.float16)
    return q, d.astype(np.float16).astype(np.float64), s.astype(np.float64)


def int_quants(raw, qt, shape):
    """The integer weights: dequantize with every scale set to 1 and every min to 0."""
    ts = GGML_QUANT_SIZES[qt][1]
    blocks = raw.reshape(-1, ts).copy()
    blocks[:, 0:2] = np.array([1], np.float16).view(np.uint8)
    if qt in HAS_MIN:
        blocks[:, 2:4] = 0
    return gguf.quants.dequantize(blocks.reshape(raw.shape), qt).reshape(shape).astype(np.int64)


def scales(raw, qt, off):
    ts = GGML_QUANT_SIZES[qt][1]
    b = raw.reshape(-1, ts)[:, off:off + 2].copy()
    return b.view(np.float16).astype(np.float64).reshape(raw.shape[0], -1)


def test_q8_rounds_half_to_even():
    # amax 127 makes the multiplier exactly 1, so x*mul is exactly x: hand-checkable
    x = np.zeros(32, np.float32)
    x[:6] = [127, 2.5, -2.5, 3.5, 0.5, -1.5]
    qs, d, s = quantize_activations(x)
    assert qs[:6].tolist() == [127, 2, -2, 4, 0, -2]
    assert d[0] == np.float32(np.float16(1.0)) and s[0] == np.float32(np.float16(127 + 2 - 2 + 4 + 0 - 2))


@pytest.mark.parametrize("n_tok", [1, 3])
def test_q8_activation_matches_numpy_reference(n_tok):
    rng = np.random.default_rng(1)
    x = np.stack([random_x(32 * 9, rng) for _ in range(n_tok)])
    qs, d, s = quantize_activations(x)
    for t in range(n_tok):
        q_ref, d_ref, s_ref = ref_q8(x[t])
        np.testing.assert_array_equal(qs[t].reshape(-1, 32), q_ref, err_msg="qs exact")
        np.testing.assert_array_equal(d[t], d_ref, err_msg="d exact")
        np.testing.assert_array_equal(s[t], s_ref, err_msg="s exact")


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("nan_scales", [False, True])
def test_dequantize_bit_exact(qt, nan_scales):
    rng = np.random.default_rng(int(qt) + 10 * nan_scales)
    for n_rows, n_blocks in ((1, 1), (3, 2), (5, 7)):
        raw = random_weights(qt, n_rows, n_blocks, rng, nan_scales)
        got = dequantize(raw, qt, (n_rows, 32 * n_blocks))
        want = gguf.quants.dequantize(raw, qt)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg="bit patterns")


def matvec_refs(raw, qt, shape, x):
    """(ggml-arithmetic reference on the quantized x, its magnitude, dequantize(W) @ x)."""
    q_w = int_quants(raw, qt, (shape[0], -1, 32))
    q_x, d_x, s_x = ref_q8(x)
    d_w = scales(raw, qt, 0)
    terms = d_w * d_x * (q_w * q_x).sum(axis=2)
    if qt in HAS_MIN:
        terms = np.concatenate([terms, scales(raw, qt, 2) * s_x], axis=1)
    wf = gguf.quants.dequantize(raw, qt).astype(np.float64)
    return terms.sum(axis=1), np.abs(terms).sum(axis=1), wf @ x.astype(np.float64)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_matvec(qt):
    rng = np.random.default_rng(int(qt))
    for n_rows, n_blocks in ((1, 1), (4, 3), (9, 12)):
        shape = (n_rows, 32 * n_blocks)
        raw = random_weights(qt, n_rows, n_blocks, rng)
        x = random_x(shape[1], rng)
        y = matvec(raw, qt, shape, x).astype(np.float64)
        ref, mag, dense = matvec_refs(raw, qt, shape, x)
        # same quantized x: only float32 roundings differ (d_w*d_x, the scaling and the sum over
        # blocks: at most 2 * n_blocks + 4 roundings in any order)
        tol = (2 * n_blocks + 4) * EPS32 * mag + 1e-37
        assert np.all(np.abs(y - ref) <= tol), f"tight: max excess {np.max(np.abs(y - ref) - tol)}"
        # vs unquantized x: each x_i moves by <= d*(1/2 + 127*2^-11) (rint plus fp16 d), d = amax/127;
        # the _1 types' fp16 s = fp16(d*sum q) adds <= |m| * d * 32*127 * 2^-10
        d_x = np.abs(x.reshape(-1, 32)).max(axis=1).astype(np.float64) / 127
        wf = np.abs(gguf.quants.dequantize(raw, qt).astype(np.float64)).reshape(n_rows, -1, 32)
        loose = (wf.sum(axis=2) * d_x * (0.5 + 127 * 2 ** -11)).sum(axis=1) * 1.001 + tol
        if qt in HAS_MIN:
            loose += (np.abs(scales(raw, qt, 2)) * d_x * 32 * 127 * 2 ** -10).sum(axis=1)
        assert np.all(np.abs(y - dense) <= loose), f"loose: max excess {np.max(np.abs(y - dense) - loose)}"


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_matmul_rows_equal_matvec(qt):
    rng = np.random.default_rng(100 + int(qt))
    shape = (7, 32 * 5)
    raw = random_weights(qt, shape[0], 5, rng)
    x = np.stack([random_x(shape[1], rng) for _ in range(4)])
    y = matmul(raw, qt, shape, x)
    assert y.shape == (4, 7)
    for t in range(4):  # same kernels and arithmetic: bit-identical
        np.testing.assert_array_equal(y[t], matvec(raw, qt, shape, x[t]))


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_api_accepts_any_raw_shape(qt):
    rng = np.random.default_rng(7)
    raw = random_weights(qt, 6, 2, rng)  # shape (2, 3, 64) as stored, (6, row_bytes) as rows
    want = gguf.quants.dequantize(raw, qt).reshape(2, 3, 64)
    for r in (raw, raw.reshape(-1), raw.reshape(2, 3, -1)):
        np.testing.assert_array_equal(dequantize(r, qt, (2, 3, 64)).view(np.uint32), want.view(np.uint32))
        x = random_x(64, rng)
        np.testing.assert_array_equal(matvec(r, qt, (2, 3, 64), x), matvec(raw, qt, (6, 64), x))
        X = x[None, :].repeat(2, axis=0)
        np.testing.assert_array_equal(matmul(r, qt, (6, 64), X)[1], matvec(raw, qt, (6, 64), x))


def test_matvec_on_prequantized_activation():
    rng = np.random.default_rng(3)
    raw = random_weights(T.Q8_0, 5, 4, rng)
    x = random_x(128, rng)
    out = np.empty((1, 5), np.float32)
    quant_type(T.Q8_0).matmul_prepared_into(out, quantize_activations(x[None]), raw)
    np.testing.assert_array_equal(out[0], matvec(raw, T.Q8_0, (5, 128), x))


def test_wrong_sizes_are_rejected():
    raw = np.zeros(2 * 34, np.uint8)
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize(raw, T.Q8_0, (2, 48))
    with pytest.raises(ValueError, match="expected 102 bytes, got 68"):
        matvec(raw, T.Q8_0, (3, 32), np.zeros(32, np.float32))


def ggml_cpu():
    """llama-cpp-python's native ggml CPU library (the x86 kernels llama.cpp runs here)."""
    import ctypes
    import os

    import llama_cpp
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so"))
    lib.ggml_cpu_init()
    p, i64, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    for name in ("quantize_row_q8_0", "quantize_row_q8_1"):
        getattr(lib, name).argtypes = [p, p, i64]
    for qt in TYPES:
        fn = getattr(lib, f"ggml_vec_dot_{qt.name.lower()}_q8_{qt.name[-1]}")
        fn.argtypes = [ctypes.c_int, p, sz, p, sz, p, sz, ctypes.c_int]
    return lib


def ggml_q8(lib, x, kind):
    """ggml's own Q8_<kind> blocks of x, as a u8[n_blocks, 34 or 36] array."""
    out = np.zeros((x.size // 32, 34 if kind == "0" else 36), np.uint8)
    getattr(lib, f"quantize_row_q8_{kind}")(x.ctypes.data, out.ctypes.data, x.size)
    return out


@pytest.mark.reference
def test_q8_activation_matches_ggml():
    lib = ggml_cpu()
    rng = np.random.default_rng(11)
    x = random_x(32 * 40, rng)
    qs, d, s = quantize_activations(x)
    b0, b1 = ggml_q8(lib, x, "0"), ggml_q8(lib, x, "1")
    np.testing.assert_array_equal(qs.reshape(-1, 32), b0[:, 2:].view(np.int8), err_msg="q8_0 qs exact")
    np.testing.assert_array_equal(qs.reshape(-1, 32), b1[:, 4:].view(np.int8), err_msg="q8_1 qs exact")
    np.testing.assert_array_equal(d, b0[:, :2].copy().view(np.float16).ravel(), err_msg="d exact")
    np.testing.assert_array_equal(s, b1[:, 2:4].copy().view(np.float16).ravel(), err_msg="s exact")


@pytest.mark.reference
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_matvec_matches_ggml_vec_dot(qt):
    import ctypes
    import platform
    lib = ggml_cpu()
    dot = getattr(lib, f"ggml_vec_dot_{qt.name.lower()}_q8_{qt.name[-1]}")
    rng = np.random.default_rng(20 + int(qt))
    n_rows, n_blocks = 6, 37
    shape = (n_rows, 32 * n_blocks)
    raw = random_weights(qt, n_rows, n_blocks, rng)
    x = random_x(shape[1], rng)
    xq = ggml_q8(lib, x, qt.name[-1])
    y = matvec(raw, qt, shape, x)
    _, mag, _ = matvec_refs(raw, qt, shape, x)
    want = np.empty(n_rows, np.float32)
    for r in range(n_rows):
        s = ctypes.c_float()
        dot(shape[1], ctypes.addressof(s), 0, raw[r].ctypes.data, 0, xq.ctypes.data, 0, 1)
        want[r] = s.value
    if platform.machine().lower() in ("x86_64", "amd64") and lib.ggml_cpu_has_avx2():
        # we reproduce the AVX2 vec_dot's float operations one for one: bit-identical
        np.testing.assert_array_equal(y.view(np.uint32), want.view(np.uint32))
    else:  # other SIMD paths sum in another order: both within (2 * n_blocks + 4) roundings
        tol = 2 * (2 * n_blocks + 4) * EPS32 * mag + 1e-37
        assert np.all(np.abs(y - want.astype(np.float64)) <= tol)

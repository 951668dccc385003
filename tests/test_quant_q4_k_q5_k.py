"""Q4_K and Q5_K kernels against gguf-py and float64 references.

Weights are random bytes with chosen fp16 d/dmin (gguf-py cannot quantize
K-quants): extremes, subnormals, signed zeros, inf/nan (dequantize only) and
all-zero blocks.
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import Q4_K as GQ4_K
from gguf.quants import dequantize as gguf_dequantize

from localmoe.quant import dequantize, matmul, matvec, quant_type
from localmoe.quant.common import q8_k_buffers, quantize_q8_k_rows
from localmoe.quant.q4_k import quantize_activation

QTYPES = [T.Q4_K, T.Q5_K]
# 5 x 8448: odd row count and more than Q4_K.pair_cols columns (row-pair matvec)
SHAPES = [(1, 256), (3, 768), (17, 2048), (5, 8448)]
# fp16 bit patterns: +-65504, smallest and largest subnormal, +-0, 1
EXTREME_F16 = np.array([0x7BFF, 0xFBFF, 0x0001, 0x03FF, 0x0000, 0x8000, 0x3C00], np.uint16)
# inf, -inf, quiet nan, negative nan with payload, signalling nan
SPECIAL_F16 = np.array([0x7C00, 0xFC00, 0x7E00, 0xFE5A, 0x7C01], np.uint16)


def random_weights(qtype, n_rows, n_cols, seed, special=False):
    """u8[n_rows, row_bytes]: random blocks whose d and dmin are drawn from normal and extreme fp16 values."""
    ts = quant_type(qtype).type_size
    rng = np.random.default_rng(seed)
    nb = n_cols // 256
    raw = rng.integers(0, 256, (n_rows, nb, ts), dtype=np.uint8)
    f16 = np.float16(rng.normal(0, 0.01, (n_rows, nb, 2))).view(np.uint16)
    pick = rng.random(f16.shape)
    f16 = np.where(pick < 0.3, rng.choice(EXTREME_F16, f16.shape), f16)
    if special:
        f16 = np.where(pick > 0.9, rng.choice(SPECIAL_F16, f16.shape), f16)
    raw[:, :, 0:4] = f16.astype("<u2").view(np.uint8).reshape(n_rows, nb, 4)
    raw[rng.random((n_rows, nb)) < 0.15] = 0
    return raw.reshape(n_rows, nb * ts)


def exact_terms(qtype, raw):
    """float64 (d*scale*q, dmin*min) per weight, each exact, decoded independently of the kernels."""
    n_rows = raw.shape[0]
    blk = raw.reshape(-1, quant_type(qtype).type_size)
    d = blk[:, 0:2].copy().view(np.float16).astype(np.float64)[:, 0]
    dmin = blk[:, 2:4].copy().view(np.float16).astype(np.float64)[:, 0]
    sc, mn = GQ4_K.get_scale_min(blk[:, 4:16].copy())
    qs = blk[:, -128:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 15).reshape(-1, 8, 32).astype(np.int64)
    if qtype == T.Q5_K:
        q += ((blk[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1) * 16
    scaled = d[:, None, None] * sc.astype(np.float64)[:, :, None] * q
    mins = np.broadcast_to((dmin[:, None] * mn.astype(np.float64))[:, :, None], scaled.shape)
    return scaled.reshape(n_rows, -1), mins.reshape(n_rows, -1)


def random_x(n_tok, n_cols, seed):
    """Activations with blocks of very different magnitude and an all-zero block."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-3, 3, (n_tok, n_cols // 256)).repeat(256, axis=1).astype(np.float32)
    if n_cols > 256:
        x[:, 256:512] = 0
    return x


def q8_k(x):
    """float64 value of the Q8_K activation (what ggml dots with) and its per-element scale d8 (signed)."""
    qs, d, bsums = q8_k_buffers(*x.shape)
    quantize_q8_k_rows(x, qs, d, bsums)
    d8 = np.repeat(d.astype(np.float64), 256, axis=1)
    return qs * d8, d8


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_bit_exact(qtype):
    for i, (n_rows, n_cols) in enumerate(SHAPES):
        raw = random_weights(qtype, n_rows, n_cols, seed=i, special=True)
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 from the special scales
            ref = gguf_dequantize(raw, qtype).reshape(n_rows, n_cols)
        got = dequantize(raw, qtype, (n_rows, n_cols))
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32),
                                      err_msg=f"{qtype.name} {n_rows}x{n_cols}: bit patterns (tolerance 0)")


@pytest.mark.parametrize("qtype", QTYPES)
def test_reference_decoder_matches_gguf(qtype):
    """The test's own exact decoder agrees with gguf-py up to gguf-py's 4 float32 roundings."""
    raw = random_weights(qtype, 5, 1024, seed=3)
    scaled, mins = exact_terms(qtype, raw)
    ref = gguf_dequantize(raw, qtype).reshape(5, 1024).astype(np.float64)
    bound = 2.0 ** -22 * (np.abs(scaled) + np.abs(mins))  # 4 roundings of at most 2^-24 relative each
    assert (np.abs(ref - (scaled - mins)) <= bound).all(), f"{qtype.name}: test decoder vs gguf-py beyond 2^-22 relative"


@pytest.mark.parametrize("qtype", QTYPES)
def test_matvec(qtype):
    for i, (n_rows, n_cols) in enumerate(SHAPES):
        raw = random_weights(qtype, n_rows, n_cols, seed=10 + i)
        x = random_x(1, n_cols, seed=20 + i)
        scaled, mins = exact_terms(qtype, raw)
        w = scaled - mins
        y = matvec(raw, qtype, (n_rows, n_cols), x[0]).astype(np.float64)

        # Same Q8_K activation in exact arithmetic: only float32 rounding of
        # x.d*d, x.d*dmin, the block products and the sums over blocks remains;
        # scale it by the term magnitudes, as d*scale*q and dmin*min can cancel.
        xq, d8 = q8_k(x)
        mag = (np.abs(scaled) + np.abs(mins)) @ np.abs(xq[0])
        tight = 1e-5 * mag + 1e-30
        err = np.abs(y - w @ xq[0])
        assert (err <= tight).all(), f"{qtype.name} {n_rows}x{n_cols}: |y - W@xq| {err} > 1e-5*sum|terms||xq| {tight}"

        # Against unquantized x: Q8_K rounds x/d8 to an integer, so
        # |x - xq| <= |d8|/2 (x1.001 covers the float32 rounding of x/d8 and d8).
        loose = np.abs(w) @ (0.5005 * np.abs(d8[0])) + tight
        err = np.abs(y - w @ x[0].astype(np.float64))
        assert (err <= loose).all(), f"{qtype.name} {n_rows}x{n_cols}: |y - W@x| {err} > Q8_K rounding bound {loose}"


@pytest.mark.parametrize("qtype", QTYPES)
def test_matmul_rows_equal_matvec(qtype):
    for i, (n_rows, n_cols) in enumerate(SHAPES):
        raw = random_weights(qtype, n_rows, n_cols, seed=30 + i)
        xs = random_x(4, n_cols, seed=40 + i)
        got = matmul(raw, qtype, (n_rows, n_cols), xs)
        for t in range(xs.shape[0]):
            y = matvec(raw, qtype, (n_rows, n_cols), xs[t])
            np.testing.assert_array_equal(got[t].view(np.uint32), y.view(np.uint32),
                                          err_msg=f"{qtype.name} token {t}: matmul row vs matvec (bit-identical)")


@pytest.mark.parametrize("qtype", QTYPES)
def test_api_any_shape(qtype):
    """(expert, rows, cols) weights given as flat or oddly shaped uint8 arrays."""
    n_exp, n_rows, n_cols = 3, 4, 512
    shape = (n_exp, n_rows, n_cols)
    raw = random_weights(qtype, n_exp * n_rows, n_cols, seed=50)
    ref = dequantize(raw, qtype, (n_exp * n_rows, n_cols))
    x = random_x(1, n_cols, seed=51)[0]
    y_ref = matvec(raw, qtype, (n_exp * n_rows, n_cols), x)
    for arr in (raw.reshape(-1), raw.reshape(n_exp, -1), raw.reshape(n_exp, n_rows, -1, 4)):
        got = dequantize(arr, qtype, shape)
        assert got.shape == shape
        np.testing.assert_array_equal(got.reshape(-1, n_cols).view(np.uint32), ref.view(np.uint32),
                                      err_msg=f"{qtype.name} raw shape {arr.shape}: dequantize (bit-identical)")
        np.testing.assert_array_equal(matvec(arr, qtype, shape, x).view(np.uint32), y_ref.view(np.uint32),
                                      err_msg=f"{qtype.name} raw shape {arr.shape}: matvec (bit-identical)")
        np.testing.assert_array_equal(matmul(arr, qtype, shape, x[None])[0].view(np.uint32), y_ref.view(np.uint32),
                                      err_msg=f"{qtype.name} raw shape {arr.shape}: matmul (bit-identical)")


@pytest.mark.parametrize("qtype", QTYPES)
def test_prequantized_activation_reused(qtype):
    """One quantized activation, reused: matmul_prepared / _matmul equal matmul/matvec from float x."""
    raw = random_weights(qtype, 6, 768, seed=60)
    xs = random_x(3, 768, seed=61)
    qt = quant_type(qtype)
    want = matmul(raw, qtype, (6, 768), xs)
    qs, d8, bsums = q8_k_buffers(*xs.shape)
    quantize_q8_k_rows(xs, qs, d8, bsums)
    act = quantize_activation(xs)
    for name, run in (("matmul_prepared", lambda out, t: qt.matmul_prepared(out, act if t is None else [a[t] for a in act], raw)),
                      ("_matmul", lambda out, t: qt._matmul(out, *((qs, d8, bsums) if t is None else (qs[t], d8[t], bsums[t])), raw))):
        out = np.empty((3, 6), np.float32)
        run(out, None)
        np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32), err_msg=f"{qtype.name} {name} (bit-identical)")
        one = np.empty(6, np.float32)
        run(one, 1)
        np.testing.assert_array_equal(one.view(np.uint32), want[1].view(np.uint32),
                                      err_msg=f"{qtype.name} {name}, one token (bit-identical)")
    with pytest.raises(ValueError):
        qt.matmul_prepared(np.empty(6, np.float32), act, raw)  # 3 tokens into a 1-token output

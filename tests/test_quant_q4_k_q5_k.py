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

from localmoe.quant import matmul, matvec, quant_type
from quant_helpers import assert_api_any_shape, assert_dequantize_bit_exact, q8_k, random_weights, random_x

QTYPES = [T.Q4_K, T.Q5_K]
# 5 x 8448: odd row count and more than Q4_K.pair_cols columns (row-pair matvec)
SHAPES = [(1, 256), (3, 768), (17, 2048), (5, 8448)]


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


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_bit_exact(qtype):
    assert_dequantize_bit_exact(qtype, SHAPES)


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
    assert_api_any_shape(qtype)


@pytest.mark.parametrize("qtype", QTYPES)
def test_prepared_activation_reused(qtype):
    """One prepared (widened Q8_K) activation, reused: matmul_prepared_into equals matmul/matvec from float x."""
    raw = random_weights(qtype, 6, 768, seed=60)
    xs = random_x(3, 768, seed=61)
    qt = quant_type(qtype)
    want = matmul(raw, qtype, (6, 768), xs)
    act = qt.prepare(xs)
    out = np.empty((3, 6), np.float32)
    qt.matmul_prepared_into(out, act, raw)
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32), err_msg=f"{qtype.name} (bit-identical)")
    one = np.empty((1, 6), np.float32)  # one token: the matvec kernel
    qt.matmul_prepared_into(one, qt.take_rows(act, slice(1, 2)), raw)
    np.testing.assert_array_equal(one[0].view(np.uint32), want[1].view(np.uint32),
                                  err_msg=f"{qtype.name}, one token (bit-identical)")
    with pytest.raises(ValueError):
        qt.matmul_prepared_into(np.empty((1, 6), np.float32), act, raw)  # 3 tokens into a 1-token output

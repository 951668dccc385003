"""Q6_K kernels against gguf-py and float64 references.

The helpers here are shared with test_quant_q3_k.py and test_quant_q2_k.py.
Test weights are random bytes with chosen fp16 super-scales (gguf-py has no
K-quant quantizer): extremes, subnormals, signed zeros, and all-zero blocks.
"""
import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from localmoe.quant import dequantize, matmul, matvec, quant_type
from localmoe.quant.common import q8_k_buffers, quantize_q8_k_rows

SHAPES = [(1, 256), (3, 512), (7, 1024), (2, 2048), (37, 256)]  # 37 rows: several parallel row chunks
# fp16 bit patterns: +-65504, smallest subnormal, subnormal, smallest normal, +-0, 1, -0.5
EXTREME_F16 = np.array([0x7BFF, 0xFBFF, 0x0001, 0x8123, 0x0400, 0x0000, 0x8000, 0x3C00, 0xB800], np.uint16)
# dequantize must also reproduce inf/nan (incl. payloads) bit for bit
SPECIAL_F16 = np.array([0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01], np.uint16)
# byte offsets of the fp16 fields in each block
F16_FIELDS = {T.Q6_K: [208], T.Q3_K: [108], T.Q2_K: [80, 82]}


def random_weights(qtype, n_rows, n_cols, seed, special=False):
    """u8[n_rows, row_bytes] of random blocks with controlled fp16 super-scale fields."""
    qt = quant_type(qtype)
    rng = np.random.default_rng(seed)
    nb = n_cols // qt.block_size
    raw = rng.integers(0, 256, (n_rows, nb, qt.type_size), dtype=np.uint8)
    for off in F16_FIELDS[qt.qtype]:
        f16 = np.float16(rng.normal(0, 0.02, (n_rows, nb))).view(np.uint16)
        pick = rng.random((n_rows, nb))
        f16 = np.where(pick < 0.25, rng.choice(EXTREME_F16, (n_rows, nb)), f16)
        if special:
            f16 = np.where(pick > 0.9, rng.choice(SPECIAL_F16, (n_rows, nb)), f16)
        raw[:, :, off:off + 2] = f16.astype("<u2").view(np.uint8).reshape(n_rows, nb, 2)
    raw[rng.random((n_rows, nb)) < 0.1] = 0  # all-zero blocks
    return raw.reshape(n_rows, nb * qt.type_size)


def random_x(n_cols, seed):
    """Activations with a zero block and blocks of very different magnitude."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n_cols).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-3, 3, n_cols // 256).repeat(256).astype(np.float32)
    if n_cols > 256:
        x[256:512] = 0
    return x


def q8_k_dequantized(x):
    """float64 values of the Q8_K activation the kernels use (x: f32[n_tok, n])."""
    qs, d, bsums = q8_k_buffers(*x.shape)
    quantize_q8_k_rows(x, qs, d, bsums)
    return qs.astype(np.float64) * np.repeat(d.astype(np.float64), 256, axis=1)


def assert_dequantize_bit_exact(qtype):
    for i, (n_rows, n_cols) in enumerate(SHAPES):
        raw = random_weights(qtype, n_rows, n_cols, seed=i, special=True)
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 in the special scales
            ref = gguf_dequantize(raw, qtype).reshape(n_rows, n_cols)
        got = dequantize(raw, qtype, (n_rows, n_cols))
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32),
                                      err_msg=f"{qtype.name} {n_rows}x{n_cols}: dequantize bit patterns (tolerance 0)")


def assert_matvec_close(qtype, magnitude):
    """matvec vs float64 references. magnitude(raw) -> f64 bound on each |term| of a weight."""
    for i, (n_rows, n_cols) in enumerate(SHAPES):
        raw = random_weights(qtype, n_rows, n_cols, seed=10 + i)
        x = random_x(n_cols, seed=20 + i)
        w = gguf_dequantize(raw, qtype).reshape(n_rows, n_cols).astype(np.float64)
        mag = magnitude(raw)
        y = matvec(raw, qtype, (n_rows, n_cols), x).astype(np.float64)

        # Same Q8_K activation in exact arithmetic: only fp32 rounding of the
        # per-block scale products and of the sum over blocks remains.
        xq = q8_k_dequantized(x[None])[0]
        tight = 1e-5 * (mag @ np.abs(xq)) + 1e-30
        err = np.abs(y - w @ xq)
        assert (err <= tight).all(), f"{qtype.name} {n_rows}x{n_cols}: |y - W@xq| {err} > 1e-5*|W|@|xq| {tight}"

        # Against unquantized x: Q8_K rounds each x to a multiple of d8 = amax/127
        # of its 256-block, so |x - xq| <= amax/254 (1e-5 slack for fp32 d8).
        amax = np.abs(x.astype(np.float64)).reshape(-1, 256).max(axis=1).repeat(256)
        loose = mag @ (amax / 254 * (1 + 1e-5)) + tight
        err = np.abs(y - w @ x.astype(np.float64))
        assert (err <= loose).all(), f"{qtype.name} {n_rows}x{n_cols}: |y - W@x| {err} > Q8_K bound {loose}"


def assert_matmul_rows_equal_matvec(qtype, batch_formula_from=None):
    """matmul rows == matvec bit for bit. Types whose batches follow llama.cpp's tiled
    kernel from `batch_formula_from` tokens on (a different fp32 rounding order) must
    match bit for bit below it, and above it within fp32 accumulation error:
    |diff| <= 1e-5 * |W| @ |xq| (xq the Q8_K activation), as in assert_matvec_close."""
    for i, (n_rows, n_cols) in enumerate(SHAPES):
        raw = random_weights(qtype, n_rows, n_cols, seed=30 + i)
        for n_tok in (6, 11):  # below and above one token tile
            xs = np.stack([random_x(n_cols, seed=40 + i + 7 * t) for t in range(n_tok)])
            got = matmul(raw, qtype, (n_rows, n_cols), xs)
            n_threads = numba.get_num_threads()
            numba.set_num_threads(1)  # rows are independent: the thread split must not matter
            try:
                np.testing.assert_array_equal(matmul(raw, qtype, (n_rows, n_cols), xs), got,
                                              err_msg=f"{qtype.name}: matmul on 1 vs {n_threads} threads (bit-identical)")
            finally:
                numba.set_num_threads(n_threads)
            exact = batch_formula_from is None or n_tok < batch_formula_from
            for t in range(n_tok):
                y = matvec(raw, qtype, (n_rows, n_cols), xs[t])
                if exact:
                    np.testing.assert_array_equal(got[t].view(np.uint32), y.view(np.uint32),
                                                  err_msg=f"{qtype.name} token {t}/{n_tok}: matmul row vs matvec (bit-identical)")
                else:
                    w = np.abs(dequantize(raw, qtype, (n_rows, n_cols)).astype(np.float64))
                    bound = 1e-5 * (w @ np.abs(q8_k_dequantized(xs[t][None])[0])) + 1e-30
                    err = np.abs(got[t].astype(np.float64) - y)
                    assert (err <= bound).all(), f"{qtype.name} token {t}/{n_tok}: tiled batch vs matvec {err} > {bound}"


def assert_api_any_shape(qtype):
    """3-D (expert, rows, cols) weights given as flat or oddly shaped uint8 arrays."""
    n_exp, n_rows, n_cols = 3, 4, 512
    raw = random_weights(qtype, n_exp * n_rows, n_cols, seed=50)
    ref = dequantize(raw, qtype, (n_exp * n_rows, n_cols))
    x = random_x(n_cols, seed=51)
    y_ref = matvec(raw, qtype, (n_exp * n_rows, n_cols), x)
    for arr in (raw.reshape(-1), raw.reshape(n_exp, -1), raw.reshape(n_exp, n_rows, -1, 2)):
        shape = (n_exp, n_rows, n_cols)
        got = dequantize(arr, qtype, shape)
        assert got.shape == shape
        np.testing.assert_array_equal(got.reshape(-1, n_cols).view(np.uint32), ref.view(np.uint32),
                                      err_msg=f"{qtype.name} raw shape {arr.shape}: dequantize (bit-identical)")
        np.testing.assert_array_equal(matvec(arr, qtype, shape, x).view(np.uint32), y_ref.view(np.uint32),
                                      err_msg=f"{qtype.name} raw shape {arr.shape}: matvec (bit-identical)")
        np.testing.assert_array_equal(matmul(arr, qtype, shape, x[None])[0].view(np.uint32), y_ref.view(np.uint32),
                                      err_msg=f"{qtype.name} raw shape {arr.shape}: matmul (bit-identical)")
    with pytest.raises(ValueError):
        dequantize(raw[:-1], qtype, (n_exp * n_rows, n_cols))


def assert_quantized_activation_reuse(qtype):
    """One Q8_K activation reused for several experts gives each expert's matmul result."""
    qt = quant_type(qtype)
    n_exp, n_rows, n_cols = 3, 5, 768
    raw = random_weights(qtype, n_exp * n_rows, n_cols, seed=60).reshape(n_exp, n_rows, -1)
    xs = np.stack([random_x(n_cols, seed=61 + t) for t in range(2)])
    act = qt.quantize_activation(xs)
    act16 = (act[0].astype(np.int16),) + act[1:]  # Q4_K's widened form is accepted too
    for e in range(n_exp):
        want = matmul(raw[e], qtype, (n_rows, n_cols), xs)
        for a in (act, act16):
            out = np.empty((2, n_rows), np.float32)
            qt.matmul_quantized_into(out, a, raw[e])
            np.testing.assert_array_equal(out, want, err_msg=f"{qtype.name} expert {e}, qs {a[0].dtype}: "
                                                            "reused activation (bit-identical)")
    with pytest.raises(ValueError, match="C-contiguous"):  # the kernels trust shapes: checked before
        qt.matmul_quantized_into(np.empty((2, n_rows), np.float32), act, raw[0][:, :-1])
    with pytest.raises(ValueError, match="C-contiguous"):
        qt.matmul_quantized_into(np.empty((2, n_rows + 1), np.float32), act, raw[0])


def abs_weights(qtype):
    return lambda raw: np.abs(gguf_dequantize(raw, qtype).astype(np.float64)).reshape(raw.shape[0], -1)


def test_q6_k_dequantize_bit_exact():
    assert_dequantize_bit_exact(T.Q6_K)


def test_q6_k_matvec():
    assert_matvec_close(T.Q6_K, abs_weights(T.Q6_K))


def test_q6_k_matmul_rows_equal_matvec():
    assert_matmul_rows_equal_matvec(T.Q6_K)


def test_q6_k_api_any_shape():
    assert_api_any_shape(T.Q6_K)


def test_q6_k_quantized_activation_reuse():
    assert_quantized_activation_reuse(T.Q6_K)


def test_q6_k_layout_single_element():
    """One nonzero quant at each position lands where ggml's layout puts it."""
    raw = np.zeros((256, 210), np.uint8)
    raw[:, 192:208] = 1  # scales
    raw[:, 208:210] = np.array([0x3C00], "<u2").view(np.uint8)  # d = 1
    for e in range(256):
        h, k, l = e // 128, (e % 128) // 32, e % 32
        # q = 33 (-> weight 1): low nibble 1, high bits 0b10
        raw[e, 64 * h + 32 * (k & 1) + l] = 1 << (4 * (k >> 1))
        raw[e, 128 + 32 * h + l] = 2 << (2 * k)
    # all other elements have q = 0 -> weight -32
    want = np.full((256, 256), -32.0, np.float32)
    np.fill_diagonal(want, 1.0)
    np.testing.assert_array_equal(dequantize(raw, T.Q6_K, (256, 256)), want, err_msg="Q6_K element positions (exact)")

"""Shared by the quant tests: random K-quant blocks and activations with the
checks every K-quant kernel must pass, and the llama.cpp quantizer oracles."""
import ctypes
from pathlib import Path

import gguf
import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from localmoe.quant import dequantize, matmul, matvec, quant_type
from localmoe.quant.common import q8_k_buffers, quantize_q8_k_rows

# --- K-quant kernels ------------------------------------------------------------------

# 37 rows: several parallel row chunks; 9728 columns: rows over 4 KiB in every K-quant
SHAPES = [(1, 256), (3, 512), (7, 1024), (2, 2048), (37, 256), (3, 9728)]
# fp16 bit patterns: +-65504, smallest and largest subnormal, other subnormals, smallest normal, +-0, 1, -0.5
EXTREME_F16 = np.array([0x7BFF, 0xFBFF, 0x0001, 0x03FF, 0x8123, 0x0400, 0x0000, 0x8000, 0x3C00, 0xB800], np.uint16)
# inf, -inf, quiet nans (negative ones with payloads), signalling nan: dequantize must keep their bits
SPECIAL_F16 = np.array([0x7C00, 0xFC00, 0x7E00, 0xFE01, 0xFE5A, 0x7C01], np.uint16)
# byte offsets of the fp16 fields (d, and dmin where present) in each block
F16_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_weights(qtype, n_rows, n_cols, seed, special=False):
    """u8[n_rows, row_bytes] of random K-quant blocks with controlled fp16 scale fields
    (normal, EXTREME_F16, with `special` also SPECIAL_F16) and some all-zero blocks."""
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
    raw[rng.random((n_rows, nb)) < 0.1] = 0
    return raw.reshape(n_rows, nb * qt.type_size)


def random_x(n_tok, n_cols, seed):
    """f32[n_tok, n_cols]: blocks of 256 of very different magnitude, and an all-zero block."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-3, 3, (n_tok, n_cols // 256)).repeat(256, axis=1).astype(np.float32)
    if n_cols > 256:
        x[:, 256:512] = 0
    return x


def q8_k(x):
    """(float64 value of x's Q8_K activation, which the kernels dot with; its per-element scale d8)."""
    qs, d, bsums = q8_k_buffers(*x.shape)
    quantize_q8_k_rows(x, qs, d, bsums)
    d8 = np.repeat(d.astype(np.float64), 256, axis=1)
    return qs * d8, d8


def abs_weights(qtype):
    return lambda raw: np.abs(gguf_dequantize(raw, qtype).astype(np.float64)).reshape(raw.shape[0], -1)


def assert_dequantize_bit_exact(qtype, shapes=SHAPES):
    for i, (n_rows, n_cols) in enumerate(shapes):
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
        x = random_x(1, n_cols, seed=20 + i)[0]
        w = gguf_dequantize(raw, qtype).reshape(n_rows, n_cols).astype(np.float64)
        mag = magnitude(raw)
        y = matvec(raw, qtype, (n_rows, n_cols), x).astype(np.float64)

        # Same Q8_K activation in exact arithmetic: only fp32 rounding of the
        # per-block scale products and of the sum over blocks remains.
        xq = q8_k(x[None])[0][0]
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
            xs = np.concatenate([random_x(1, n_cols, seed=40 + i + 7 * t) for t in range(n_tok)])
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
                    bound = 1e-5 * (w @ np.abs(q8_k(xs[t][None])[0][0])) + 1e-30
                    err = np.abs(got[t].astype(np.float64) - y)
                    assert (err <= bound).all(), f"{qtype.name} token {t}/{n_tok}: tiled batch vs matvec {err} > {bound}"


def assert_api_any_shape(qtype):
    """3-D (expert, rows, cols) weights given as flat or oddly shaped uint8 arrays."""
    n_exp, n_rows, n_cols = 3, 4, 512
    raw = random_weights(qtype, n_exp * n_rows, n_cols, seed=50)
    ref = dequantize(raw, qtype, (n_exp * n_rows, n_cols))
    x = random_x(1, n_cols, seed=51)[0]
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
    """One Q8_K activation reused for several experts gives each expert's matmul result
    (Q2_K, Q3_K, Q6_K: they take qs as int8 or as int16)."""
    qt = quant_type(qtype)
    n_exp, n_rows, n_cols = 3, 5, 768
    raw = random_weights(qtype, n_exp * n_rows, n_cols, seed=60).reshape(n_exp, n_rows, -1)
    xs = np.concatenate([random_x(1, n_cols, seed=61 + t) for t in range(2)])
    act = qt.prepare(xs)
    act16 = (act[0].astype(np.int16),) + act[1:]
    for e in range(n_exp):
        want = matmul(raw[e], qtype, (n_rows, n_cols), xs)
        for a in (act, act16):
            out = np.empty((2, n_rows), np.float32)
            qt.matmul_prepared_into(out, a, raw[e])
            np.testing.assert_array_equal(out, want, err_msg=f"{qtype.name} expert {e}, qs {a[0].dtype}: "
                                                            "reused activation (bit-identical)")
    with pytest.raises(ValueError, match="C-contiguous"):  # the kernels trust shapes: checked before
        qt.matmul_prepared_into(np.empty((2, n_rows), np.float32), act, raw[0][:, :-1])
    with pytest.raises(ValueError, match="C-contiguous"):
        qt.matmul_prepared_into(np.empty((2, n_rows + 1), np.float32), act, raw[0])


# --- quantizers against llama.cpp -------------------------------------------------------

COLS = 256  # columns of float_rows and of write_f32_model's hparams


def float_rows(rng, kind: str, n: int = 32) -> np.ndarray:
    """f32[n, COLS] quantizer test data of one of FLOAT_KINDS."""
    x = rng.standard_normal((n, COLS)).astype(np.float32)
    if kind == "normal":
        return x
    if kind == "outliers":
        x[rng.random(x.shape) < 0.02] *= 100
        return x
    if kind == "zero":  # +0 and -0: the sign of d depends on which one the scan keeps
        return np.where(x < 0, np.float32(-0.0), np.float32(0.0)).astype(np.float32)
    if kind == "constant":  # every block's values are equal: min == max, both signs
        return np.repeat(rng.standard_normal((n, 1)).astype(np.float32), COLS, axis=1)
    if kind == "tiny":  # scales in fp16's subnormal range, and below it (d rounds to 0)
        return x * np.float32(1e-6) * np.logspace(0, -30, n, dtype=np.float32)[:, None]
    if kind == "ties":
        # half-integer grids: x*id lands on .5 exactly (roundf vs rint, truncation of +8.5),
        # and each block's extreme appears with both signs (first one wins)
        x = np.round(x * 8) / 2
        x[:, ::32] = 64
        x[:, 1::32] = -64
        x[::2, ::16] = -127
        return (x * np.float32(2.0) ** rng.integers(-10, 10, (n, 1))).astype(np.float32)
    if kind == "fp16_edges":  # float -> half rounding: halfway points, near-overflow, subnormals
        h = rng.integers(0, 0x7BFF, x.shape, dtype=np.uint16).view(np.float16).astype(np.float32)
        half_ulp = np.spacing(h.astype(np.float16)).astype(np.float32) / 2
        x = np.where(rng.random(x.shape) < 0.5, h + half_ulp, h - half_ulp) * np.sign(x)
        x[0, :8] = [65504, 65519.99, -65519.99, 1e-30, 6e-8, 2.9e-8, 3e-8, -0.0]  # no inf: llama.cpp rejects it
        return x.astype(np.float32)
    raise ValueError(kind)


FLOAT_KINDS = ["normal", "outliers", "zero", "constant", "tiny", "ties", "fp16_edges"]


def write_f32_model(path: Path, tensors: dict) -> None:
    """A llama-architecture F32 file with just the hparams llama_model_quantize loads."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(len(tensors))
    w.add_embedding_length(COLS)
    w.add_context_length(128)
    w.add_feed_forward_length(COLS)
    w.add_head_count(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(COLS)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def ggml_quantize(qtype, x: np.ndarray) -> np.ndarray:
    """u8[n_rows, row_bytes]: x quantized by ggml_quantize_chunk (llama-cpp-python's libggml-base)."""
    import llama_cpp  # only the reference tests, which import it themselves, call this
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    out = np.zeros((x.shape[0], quant_type(qtype).row_bytes(x.shape[1])), np.uint8)
    n = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    assert n == out.size
    return out

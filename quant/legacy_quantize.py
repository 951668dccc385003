"""Quantizers for the 32-element block types and the float formats, as llama.cpp writes files.

ggml_quantize_chunk without an importance matrix calls quantize_row_*_ref
(ggml-quants.c), F16 uses ggml_fp32_to_fp16_row and BF16
ggml_fp32_to_bf16_row_ref. libggml-base is built without FMA, so plain
float32 arithmetic in the same order reproduces its bytes; the int casts
truncate like C's, and Q8_0 rounds half away from zero (roundf).
"""
import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from .floats import bf16_bits, f32_bits, f32_to_f16

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = int(T.Q4_0), int(T.Q4_1), int(T.Q5_0), int(T.Q5_1), int(T.Q8_0)
F32, F16, BF16 = int(T.F32), int(T.F16), int(T.BF16)
QK = 32
_FLT_MAX = np.float32(np.finfo(np.float32).max)


@njit(inline="always")
def fp16_bits(f):
    """GGML_FP32_TO_FP16: round to nearest even; any NaN becomes sign | 0x7E00."""
    u = f32_bits(f)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(((u >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7E00))
    return f32_to_f16(f)


@njit(inline="always")
def _put_f16(o, at, f):
    h = fp16_bits(f)
    o[at] = np.uint8(h & np.uint16(0xFF))
    o[at + 1] = np.uint8(h >> np.uint16(8))


@njit(inline="always")
def _roundf(x):
    """C roundf: half away from zero (np.rint would round half to even)."""
    a = abs(x)
    t = np.float32(np.int32(a))  # |x| <= 127.5 here, so the cast is a trunc
    if a - t >= np.float32(0.5):
        t += np.float32(1.0)
    return -t if x < 0 else t


@njit(inline="always")
def _absmax_signed(x):
    """The element of largest magnitude, the first one on ties (q4_0/q5_0's `amax < fabsf(v)`)."""
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    for j in range(x.size):
        a = abs(x[j])
        if amax < a:
            amax = a
            vmax = x[j]
    return vmax


@njit(inline="always")
def _min_max(x):
    lo, hi = _FLT_MAX, -_FLT_MAX
    for j in range(x.size):
        v = x[j]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    return lo, hi


@njit(inline="always")
def _inv(d):
    return np.float32(1.0) / d if d != 0 else np.float32(0.0)  # NaN d counts as true, as in C


@njit(inline="always")
def _block_q8_0(x, o):  # x f32[32] -> o u8[34]: d | qs[32]
    amax = np.float32(0.0)
    for v in x:
        a = abs(v)
        amax = amax if amax > a else a  # ggml's MAX(amax, fabsf(v))
    d = amax / np.float32(127.0)
    idd = _inv(d)
    _put_f16(o, 0, d)
    for j in range(QK):
        o[2 + j] = np.uint8(np.int32(_roundf(x[j] * idd)) & 0xFF)


@njit(inline="always")
def _block_4_5(x, o, q, kind):  # x f32[32] -> o u8[18|20|22|24]: d [| m] [| qh[4]] | qs[16]; q i32[32] scratch
    has_m = kind == Q4_1 or kind == Q5_1
    five = kind == Q5_0 or kind == Q5_1
    top = 31 if five else 15
    if has_m:
        lo, hi = _min_max(x)
        d = (hi - lo) / np.float32(top)
        _put_f16(o, 2, lo)
        bias = np.float32(0.5)
    else:
        lo = np.float32(0.0)
        d = _absmax_signed(x) / np.float32(-16.0 if five else -8.0)
        bias = np.float32(16.5 if five else 8.5)
    idd = _inv(d)
    _put_f16(o, 0, d)
    qo = (4 if has_m else 2) + (4 if five else 0)
    for j in range(QK):
        v = ((x[j] - lo) if has_m else x[j]) * idd + bias
        # (int8_t) / (uint8_t) casts truncate toward zero; Q5_1 has no MIN clamp in ggml
        q[j] = np.int32(v) if kind == Q5_1 else min(np.int32(top), np.int32(v))
    for j in range(QK // 2):
        o[qo + j] = np.uint8((q[j] & 15) | ((q[j + 16] & 15) << 4))
    if five:  # qh bit j = 5th bit of element j
        qh = np.uint32(0)
        for j in range(QK):
            qh |= np.uint32((q[j] >> 4) & 1) << np.uint32(j)
        for k in range(4):
            o[qo - 4 + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


@njit(inline="always")
def quantize_row(x, o, kind, bs):  # x f32[n] -> o u8[row_bytes] in `kind` (F32, F16, BF16 or a 32-block type)
    if kind == F32:
        o.view(np.float32)[:] = x
    elif kind == F16 or kind == BF16:
        h = o.view(np.uint16)
        for j in range(x.size):
            h[j] = fp16_bits(x[j]) if kind == F16 else bf16_bits(x[j])
    else:
        q = np.empty(QK, np.int32)
        for b in range(x.size // QK):
            xb, ob = x[b * QK:(b + 1) * QK], o[b * bs:(b + 1) * bs]
            if kind == Q8_0:
                _block_q8_0(xb, ob)
            else:
                _block_4_5(xb, ob, q, kind)


def quantize_rows(qt, w: np.ndarray) -> np.ndarray:
    """w f32[n_rows, n_cols] -> u8[n_rows, row_bytes] in qt's format (a QuantType from this family)."""
    from .kquant_quantize import quantize_rows as rows  # the one row driver; that module imports this one
    return rows(qt, w)

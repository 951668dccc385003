"""Q8_0/Q8_1 activation blocks: x as ggml's CPU backend feeds it to the legacy types.

One format serves both vec_dot types: per 32 elements, int8 qs, the scale d
(fp16-rounded, kept as float32) and s = fp16(d * sum(qs)); only the Q8_1
consumers (Q4_1, Q5_1) read s. Same arithmetic as quantize_row_q8_0/q8_1 in
ggml-cpu/arch/x86/quants.c (AVX2 path): d = amax/127, multiplier 127/amax,
round half to even (_mm256_round_ps), s from the unrounded d.
"""
import numpy as np
from numba import njit, prange

from .common import SERIAL_ACT
from .floats import f16_to_f32, f32_to_f16

QK8 = 32


@njit(inline="always")
def _to_i8(v):
    # saturating like cvtps_epi32 + packs: NaN and overflow give -128
    if v > 127:
        return np.int8(127)
    if v >= -128:
        return np.int8(v)
    return np.int8(-128)


@njit(cache=True, nogil=True)
def quantize_q8(x, qs, d, s):  # x f32[n], qs i8[n], d f32[n//32], s f32[n//32]; n % 32 == 0
    for b in range(x.size // QK8):
        o = b * QK8
        amax = np.float32(0.0)
        for j in range(QK8):
            amax = max(amax, abs(x[o + j]))
        db = amax / np.float32(127.0)
        mul = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
        isum = np.int32(0)
        for j in range(QK8):
            q = _to_i8(np.rint(x[o + j] * mul))
            qs[o + j] = q
            isum += q
        d[b] = f16_to_f32(f32_to_f16(db))
        s[b] = f16_to_f32(f32_to_f16(db * np.float32(isum)))


@njit(cache=True, nogil=True, parallel=True)
def quantize_q8_rows(x, qs, d, s):  # x f32[n_tok, n], qs i8[n_tok, n], d/s f32[n_tok, n//32]
    for t in prange(x.shape[0]):
        quantize_q8(x[t], qs[t], d[t], s[t])


@njit(cache=True, nogil=True)
def q8_serial(x):  # x f32[n_tok, n] -> (qs i8[n_tok, n], d f32[n_tok, n//32], s f32[n_tok, n//32]), on this thread
    qs, d, s = np.empty(x.shape, np.int8), np.empty((x.shape[0], x.shape[1] // QK8), np.float32), \
        np.empty((x.shape[0], x.shape[1] // QK8), np.float32)
    for t in range(x.shape[0]):
        quantize_q8(x[t], qs[t], d[t], s[t])
    return qs, d, s


def q8_buffers(n_tok: int, n: int):
    """Empty (qs, d, s) for n_tok rows of n activations (n % 32 == 0)."""
    return (np.empty((n_tok, n), np.int8), np.empty((n_tok, n // QK8), np.float32),
            np.empty((n_tok, n // QK8), np.float32))


def quantize_activations(x: np.ndarray):
    """(qs, d, s) for f32 x of shape [n] or [n_tok, n]; results keep x's leading shape."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.size <= SERIAL_ACT:  # a few rows: a parallel region's fork/join would cost more than the work
        bufs = q8_serial(x2)
    else:
        bufs = q8_buffers(*x2.shape)
        quantize_q8_rows(x2, *bufs)
    return bufs if x.ndim == 2 else tuple(b.reshape(*x.shape[:-1], b.shape[-1]) for b in bufs)

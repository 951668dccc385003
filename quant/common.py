"""Helpers shared by the kernels: fp16 decoding and the Q8_K activation format.

llama.cpp's CPU backend quantizes the activation row once per matmul into the
weight type's "vec_dot_type" and then does integer dot products. We do the
same, both for speed and so that our rounding matches llama.cpp's.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

QK_K = 256

# Every fp16 bit pattern -> float32 (exact; covers subnormals, inf, nan, -0).
F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(inline="always")
def read_f16(w, r, o):
    """fp16 stored little-endian at w[r, o:o+2] -> float32."""
    return F16_TO_F32[np.int32(w[r, o]) | (np.int32(w[r, o + 1]) << 8)]


@njit(nogil=True, cache=True)
def quantize_q8_k(x, qs, d, bsums):
    """Like ggml's quantize_row_q8_K_ref (the x86 CPU path).

    x: f32[n]  qs: i8[n]  d: f32[n // 256]  bsums: i32[n // 16]; n % 256 == 0.
    """
    for b in range(x.size // QK_K):
        base = b * QK_K
        amax = np.float32(0.0)
        vmax = np.float32(0.0)
        for j in range(QK_K):
            ax = abs(x[base + j])
            if ax > amax:
                amax = ax
                vmax = x[base + j]
        if amax == 0:
            d[b] = 0
            for j in range(QK_K):
                qs[base + j] = 0
            for j in range(QK_K // 16):
                bsums[b * 16 + j] = 0
            continue
        iscale = np.float32(-127.0) / vmax
        for j in range(QK_K):
            # rint == ggml's nearest_int (round half to even) for |v| <= 2^22
            v = np.int32(np.rint(iscale * x[base + j]))
            qs[base + j] = min(127, v)
        for j in range(QK_K // 16):
            s = np.int32(0)
            for i in range(16):
                s += qs[base + j * 16 + i]
            bsums[b * 16 + j] = s
        d[b] = np.float32(1.0) / iscale


@njit(nogil=True, cache=True, parallel=True)
def quantize_q8_k_rows(x, qs, d, bsums):
    """Row-wise quantize_q8_k. x: f32[n_tok, n]  qs: i8[n_tok, n]  d: f32[n_tok, n//256]  bsums: i32[n_tok, n//16]."""
    for t in prange(x.shape[0]):
        quantize_q8_k(x[t], qs[t], d[t], bsums[t])


def q8_k_buffers(n_tok: int, n: int):
    """Allocate (qs, d, bsums) for n_tok rows of n activations."""
    return (np.empty((n_tok, n), np.int8), np.empty((n_tok, n // QK_K), np.float32),
            np.empty((n_tok, n // 16), np.int32))


SERIAL_Q8_K = 1 << 14  # activations up to this many elements are quantized on the calling thread


def q8_k_activation(x):
    """x f32[n_tok, n] -> (qs i8[n_tok, n], d f32[n_tok, n//256], bsums i32[n_tok, n//16]).
    A few rows (decode) skip the parallel region: its fork/join would cost more than the work."""
    act = q8_k_buffers(*x.shape)
    if x.size <= SERIAL_Q8_K:
        for t in range(x.shape[0]):
            quantize_q8_k(x[t], *(a[t] for a in act))
    else:
        quantize_q8_k_rows(x, *act)
    return act



@intrinsic
def take_next(typingctx, counter):
    """Atomically counter[0] += 1, returning the old value: threads take work items from a
    shared counter (dynamic scheduling). numba's prange splits the range statically, so on a
    busy machine the thread that shares its core finishes last and everyone waits for it;
    taking items one by one, the other thread does more of them."""
    if isinstance(counter, types.Array) and counter.dtype == types.int64 and counter.ndim == 1:
        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            return builder.atomic_rmw("add", arr.data, ir.Constant(ir.IntType(64), 1), "monotonic")
        return types.int64(counter), codegen

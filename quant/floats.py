"""F32, F16 and BF16 weights.

As in ggml's CPU backend, x is first rounded to the weight's own format
(F16: fp16 round-to-nearest-even; BF16: ggml's GGML_FP32_TO_BF16), so each
product w*x is exact in float32 and only the accumulation rounds. The rounded
x is kept as float32 so the kernels need no half-precision arithmetic.
"""
import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .base import QuantType

F32, F16, BF16 = int(T.F32), int(T.F16), int(T.BF16)
_DOT_FLAGS = {"reassoc", "contract"}  # lets LLVM vectorize the float reductions


def _int_arg(builder, v, bits):
    return v if v.type.width == bits else builder.trunc(v, ir.IntType(bits))


@intrinsic
def f16_to_f32(typingctx, h):
    """fp16 bit pattern (low 16 bits of an integer) -> float32; exact, F16C vcvtph2ps on x86."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(_int_arg(builder, args[0], 16), ir.HalfType()), ir.FloatType())
    return types.float32(h), codegen


@intrinsic
def f32_to_f16(typingctx, f):
    """float32 -> fp16 bit pattern, round-to-nearest-even (like ggml's x86 _cvtss_sh(x, 0))."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(f), codegen


@intrinsic
def f32_bits(typingctx, f):
    """float32 -> its uint32 bit pattern."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(f), codegen


@intrinsic
def f32_from_bits(typingctx, u):
    """Low 32 bits of an integer -> the float32 with that bit pattern."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(_int_arg(builder, args[0], 32), ir.FloatType())
    return types.float32(u), codegen


@njit(inline="always")
def f16_to_f32_keep_nan(h):
    """Like f16_to_f32 but keeps signaling NaNs signaling, as numpy (and so gguf) does."""
    h = np.uint32(h)
    if (h & np.uint32(0x7C00)) == np.uint32(0x7C00):
        return f32_from_bits(((h & np.uint32(0x8000)) << np.uint32(16)) | np.uint32(0x7F800000)
                             | ((h & np.uint32(0x3FF)) << np.uint32(13)))
    return f16_to_f32(h)


@njit(inline="always")
def bf16_bits(f):
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN forced quiet."""
    u = f32_bits(f)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(64))
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True, nogil=True)
def round_x(x, out, kind):  # x f32[n] -> out f32[n]: x rounded to the vec_dot type of `kind`
    for i in range(x.size):
        if kind == F16:
            out[i] = f16_to_f32(f32_to_f16(x[i]))
        elif kind == BF16:
            out[i] = f32_from_bits(np.uint32(bf16_bits(x[i])) << np.uint32(16))
        else:
            out[i] = x[i]


@njit(inline="always")
def _dot_row(wr, xr, kind):  # wr u8[row_bytes], xr f32[n_cols] (already rounded)
    s = np.float32(0.0)
    if kind == F32:
        wf = wr.view(np.float32)
        for j in range(xr.size):
            s += wf[j] * xr[j]
    elif kind == F16:
        wh = wr.view(np.uint16)
        for j in range(xr.size):
            s += f16_to_f32(wh[j]) * xr[j]
    else:
        wb = wr.view(np.uint16)
        for j in range(xr.size):
            s += f32_from_bits(np.uint32(wb[j]) << np.uint32(16)) * xr[j]
    return s


@njit(cache=True, nogil=True, parallel=True, fastmath=_DOT_FLAGS)
def matvec_float(out, xr, w, kind):  # out f32[n_rows], xr f32[n_cols] (rounded), w u8[n_rows, row_bytes]
    for r in prange(w.shape[0]):
        out[r] = _dot_row(w[r], xr, kind)


@njit(cache=True, nogil=True, parallel=True, fastmath=_DOT_FLAGS)
def matmul_float(out, xr, w, kind):  # out f32[n_tok, n_rows], xr f32[n_tok, n_cols] (rounded), w u8[n_rows, row_bytes]
    for r in prange(w.shape[0]):
        wr = w[r]
        for t in range(xr.shape[0]):
            out[t, r] = _dot_row(wr, xr[t], kind)


@njit(cache=True, nogil=True, parallel=True)
def dequantize_float(out, w, kind):  # out f32[n_rows, n_cols], w u8[n_rows, row_bytes]
    for r in prange(w.shape[0]):
        if kind == F32:
            out[r, :] = w[r].view(np.float32)
        elif kind == F16:
            wh = w[r].view(np.uint16)
            for j in range(out.shape[1]):
                out[r, j] = f16_to_f32_keep_nan(wh[j])
        else:
            wh = w[r].view(np.uint16)
            for j in range(out.shape[1]):
                out[r, j] = f32_from_bits(np.uint32(wh[j]) << np.uint32(16))


class _Float(QuantType):
    def round_x(self, x: np.ndarray) -> np.ndarray:
        """x (any shape, f32) rounded to this type's vec_dot format, as float32."""
        if self.qtype == T.F32:
            return x
        out = np.empty_like(x)
        round_x(x.reshape(-1), out.reshape(-1), int(self.qtype))
        return out

    @property
    def act_format(self):
        return self.qtype.name.lower()

    def dequantize_into(self, out, w):
        dequantize_float(out, w, int(self.qtype))

    def prepare(self, x):
        """x f32[n_tok, n_cols] -> x rounded to the weight's format, still f32[n_tok, n_cols]."""
        return self.round_x(x)

    def matmul_prepared_into(self, out, act, w):
        if out.shape[0] == 1:
            matvec_float(out[0], act[0], w, int(self.qtype))
        else:
            matmul_float(out, act, w, int(self.qtype))

    def quantize(self, w):
        from .legacy_quantize import quantize_rows  # it imports this module
        return quantize_rows(self, w)


class F32Type(_Float):
    qtype = T.F32


class F16Type(_Float):
    qtype = T.F16


class BF16Type(_Float):
    qtype = T.BF16

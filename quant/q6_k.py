"""Q6_K, plus the pieces the other K-quant kernels (q3_k, q2_k) share.

Q6_K block (210 bytes, 256 weights): ql[128] low nibbles, qh[64] high 2-bit
pairs, scales i8[16] (one per 16 weights), d fp16. Weight = d * scale * (q - 32).
Element 128h + 32k + l (l < 32): low nibble k // 2 of ql[64h + 32(k % 2) + l],
high bits 2k of qh[32h + l].

As in llama.cpp, x is first quantized to Q8_K and each block's dot product is
exact integer arithmetic, scaled in float32 by d * d8 (ggml's vec_dot_*_q8_K).
The block kernels are numba intrinsics emitting generic LLVM vector IR: numba
types every integer op as int64, so plain numba loops vectorize on 64-bit
lanes; written in IR, LLVM emits byte shifts/shuffles and vpmullw + vpdpwssd
(AVX-512 VNNI here) or the equivalent on another target. matvec fuses decode
and dot; matmul decodes each row once to int16 and dots it with every token.
"""
import numba
import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .base import QuantType
from .common import QK_K, q8_k_activation, read_f16, take_next

TYPE_SIZE = 210
ROW_CHUNK = 16  # rows per parallel task; decoded for prefill, 16 rows of int16 stay in L2
# rows per task of a matvec: long runs of each thread's rows keep the hardware prefetchers
# streaming (Q6_K 151936x2048 at 2 threads: 13 ms with 16-row tasks, 5.7 ms with 256)
MATVEC_CHUNK = 256

I8, I16, I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


def vec(t, n):
    return ir.VectorType(t, n)


def splat(t, n, v):
    return ir.Constant(vec(t, n), [v] * n)


class Vec:
    """A few IRBuilder shorthands for target-independent vector code."""

    def __init__(self, builder):
        self.b = builder

    def load(self, ptr, off, n, t=I8):
        """<n x t> at ptr + off elements (unaligned)."""
        p = self.b.gep(ptr, [ir.Constant(ir.IntType(64), off)])
        return self.b.load(self.b.bitcast(p, vec(t, n).as_pointer()), align=1, typ=vec(t, n))

    def const(self, x, v):
        n = x.type.count
        return ir.Constant(x.type, list(v) if isinstance(v, (list, tuple)) else [v] * n)

    def shr(self, x, s):
        return self.b.lshr(x, self.const(x, s))

    def shl(self, x, s):
        return self.b.shl(x, self.const(x, s))

    def mask(self, x, m):
        return self.b.and_(x, self.const(x, m))

    def sub(self, x, c):
        return self.b.sub(x, self.const(x, c))

    def sext(self, x, t):
        return self.b.sext(x, vec(t, x.type.count))

    def zext(self, x, t):
        return self.b.zext(x, vec(t, x.type.count))

    def shuffle(self, x, y, idx):
        return self.b.shuffle_vector(x, y, ir.Constant(vec(I32, len(idx)), idx))

    def reduce_add(self, x):
        n, t = x.type.count, x.type.element
        fn = cgutils.get_or_insert_function(
            self.b.module, ir.FunctionType(t, [x.type]), f"llvm.vector.reduce.add.v{n}i{t.width}")
        return self.b.call(fn, [x])

    def dot_acc(self, acc, w16, q8, off, q8_dtype):
        """acc <32 x i32> += w16 <32 x i16> * q8[off:off+32], lane by lane.

        Reduced once at the end with reduce_add, LLVM may pair lanes freely:
        this is what becomes vpmaddwd/vpdpwssd. q8 may be int8 or int16
        (see KQuant.prepare for the trade-off).
        """
        q = self.load(q8, off, 32, I16) if q8_dtype == types.int16 else self.sext(self.load(q8, off, 32), I16)
        return self.b.add(acc, self.b.mul(self.sext(w16, I32), self.sext(q, I32)))


def c_matrix(*tys):
    """Typing guard for the intrinsics: their pointer arithmetic assumes C-contiguous 2-D arrays."""
    return all(isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" for t in tys)


def row_ptr(context, builder, sig, args, i):
    """Pointer to element a[r, off] for a, r, off = args[i:i+3]; a C-contiguous 2-D (no bounds check)."""
    aty, arr = sig.args[i], args[i]
    r, off = (context.cast(builder, args[i + j], sig.args[i + j], types.int64) for j in (1, 2))
    a = context.make_array(aty)(context, builder, arr)
    stride = cgutils.unpack_tuple(builder, a.strides)[0]
    size = ir.Constant(ir.IntType(64), context.get_abi_sizeof(context.get_data_type(aty.dtype)))
    byte_ptr = builder.bitcast(a.data, I8.as_pointer())
    p = builder.gep(byte_ptr, [builder.add(builder.mul(r, stride), builder.mul(off, size))])
    return builder.bitcast(p, a.data.type)


@intrinsic
def f16_at(typingctx, w, r, o):
    """The fp16 at w[r, o:o+2] as float32, converted by the hardware (vcvtph2ps), not a table:
    the 256 KiB table lookups cost cache misses in the hot loop."""
    def codegen(context, builder, sig, args):
        p = builder.bitcast(row_ptr(context, builder, sig, args, 0), ir.HalfType().as_pointer())
        return builder.fpext(builder.load(p, align=1, typ=ir.HalfType()), ir.FloatType())
    if c_matrix(w):
        return types.float32(w, r, o), codegen


def group_scales(v, sc16, j):
    """<32 x i16> with scale j in lanes 0-15 and scale j + 1 in lanes 16-31."""
    return v.shuffle(sc16, sc16, [j] * 16 + [j + 1] * 16)


def block_dot(weights, shift=0):
    """Intrinsic dot(w, r, o, qs, t, qo): exact int32 sum of weight * q8 over the block at
    w[r, o:] and the Q8_K quants qs[t, qo:qo+256] (int8 or int16), fused: no weights in memory.

    `weights(v, wp)` emits the block's eight <32 x i16> chunks of integer weights.
    `shift` scales them up first when they are so small that LLVM would otherwise
    narrow the products to bytes and lose the 16-bit pair instructions.
    Callers guarantee the indices are in range: nothing is checked.
    """
    @intrinsic
    def dot(typingctx, w, r, o, qs, t, qo):
        def codegen(context, builder, sig, args):
            v = Vec(builder)
            wp, qp = row_ptr(context, builder, sig, args, 0), row_ptr(context, builder, sig, args, 3)
            acc = splat(I32, 32, 0)
            for i, w16 in enumerate(weights(v, wp)):
                acc = v.dot_acc(acc, v.shl(w16, shift) if shift else w16, qp, 32 * i, sig.args[3].dtype)
            isum = v.reduce_add(acc)
            return builder.ashr(isum, ir.Constant(I32, shift)) if shift else isum
        if c_matrix(w, qs):
            return types.int32(w, r, o, qs, t, qo), codegen
    return dot


def block_decode(weights):
    """Intrinsic decode(ws, i, wo, w, r, o): ws[i, wo:wo+256] (int16) <- the integer weights
    of the block at w[r, o:], for `ws_dot` to reuse over many tokens. Unchecked indices."""
    @intrinsic
    def decode(typingctx, ws, i, wo, w, r, o):
        def codegen(context, builder, sig, args):
            v = Vec(builder)
            dst = row_ptr(context, builder, sig, args, 0)
            for k, w16 in enumerate(weights(v, row_ptr(context, builder, sig, args, 3))):
                p = builder.gep(dst, [ir.Constant(ir.IntType(64), 32 * k)])
                builder.store(w16, builder.bitcast(p, w16.type.as_pointer()), align=1)
            return context.get_dummy_value()
        if c_matrix(ws, w) and ws.dtype == types.int16:
            return types.void(ws, i, wo, w, r, o), codegen
    return decode


@intrinsic
def ws_dot(typingctx, ws, i, wo, qs, t, qo):
    """Exact int32 dot of decoded weights ws[i, wo:wo+256] (int16) with qs[t, qo:qo+256]. Unchecked."""
    def codegen(context, builder, sig, args):
        v = Vec(builder)
        wp, qp = row_ptr(context, builder, sig, args, 0), row_ptr(context, builder, sig, args, 3)
        acc = splat(I32, 32, 0)
        for k in range(QK_K // 32):
            acc = v.dot_acc(acc, v.load(wp, 32 * k, 32, I16), qp, 32 * k, sig.args[3].dtype)
        return v.reduce_add(acc)
    if c_matrix(ws, qs) and ws.dtype == types.int16:
        return types.int32(ws, i, wo, qs, t, qo), codegen


@njit(inline="always")
def decode_scratch(n_tok, nb):
    """int16 rows for the decoded weights of one row chunk (none needed for one token)."""
    return np.empty((ROW_CHUNK if n_tok > 1 else 0, nb * QK_K), np.int16)


def weights_q6_k(v, wp):
    """The block's integer weights scale * (q - 32), as eight <32 x i16> chunks in element order."""
    b = v.b
    sc16 = v.sext(v.load(wp, 192, 16), I16)
    chunks = []
    for h in range(2):
        a, c, hb = v.load(wp, 64 * h, 32), v.load(wp, 64 * h + 32, 32), v.load(wp, 128 + 32 * h, 32)
        quants = (b.or_(v.mask(a, 15), v.shl(v.mask(hb, 3), 4)),
                  b.or_(v.mask(c, 15), v.shl(v.mask(hb, 12), 2)),
                  b.or_(v.shr(a, 4), v.mask(hb, 48)),
                  b.or_(v.shr(c, 4), v.mask(v.shr(hb, 2), 48)))
        for k, q in enumerate(quants):
            chunks.append(b.mul(v.sext(v.sub(q, 32), I16), group_scales(v, sc16, 8 * h + 2 * k)))
    return chunks


dot_q6_k_q8_k = block_dot(weights_q6_k)
decode_q6_k = block_decode(weights_q6_k)


@njit(nogil=True, cache=True, parallel=True)
def dequantize_q6_k(out, w):  # out f32[n_rows, n_cols], w u8[n_rows, row_bytes]
    nb = out.shape[1] // QK_K
    for r in prange(out.shape[0]):
        for b in range(nb):
            o = b * TYPE_SIZE
            d = read_f16(w, r, o + 208)
            for e in range(QK_K):
                h, k, l = e >> 7, (e >> 5) & 3, e & 31
                lo = (np.int32(w[r, o + 64 * h + 32 * (k & 1) + l]) >> (4 * (k >> 1))) & 15
                hi = (np.int32(w[r, o + 128 + 32 * h + l]) >> (2 * k)) & 3
                scale = np.float32(np.int8(w[r, o + 192 + (e >> 4)]))
                # gguf-py: (d * scale) * (q - 32), in float32
                out[r, b * QK_K + e] = (d * scale) * np.float32((lo | (hi << 4)) - 32)


@njit(inline="always")
def _row_q6_k(w, r, qs, d8, t):
    """Row r of w dotted with token t of the Q8_K activation (qs, d8)."""
    acc = np.float32(0)
    for b in range(qs.shape[1] // QK_K):
        o = b * TYPE_SIZE
        isum = dot_q6_k_q8_k(w, r, o, qs, t, b * QK_K)
        acc += (d8[t, b] * f16_at(w, r, o + 208)) * np.float32(isum)
    return acc


@njit(nogil=True, cache=True, parallel=True)
def matvec_experts_q6_k(out, qs, d8, ws, sel, xrow, n_par):  # out f32[n_mat, n_sel, n_rows], qs i8[n_x, n], d8 f32[n_x, n//256], ws: n_mat x u8[n_expert, n_rows, row_bytes], sel/xrow i64[n_sel]
    # out[m, s] = ws[m][sel[s]] @ x[xrow[s]], every matrix in one parallel region
    n_mat, n_sel, n_rows = out.shape
    n_chunks = (n_rows + MATVEC_CHUNK - 1) // MATVEC_CHUNK
    counter = np.zeros(1, np.int64)
    for _ in prange(n_par):
        i = take_next(counter)
        while i < n_mat * n_sel * n_chunks:
            ms, c = i // n_chunks, i % n_chunks
            m, s = ms // n_sel, ms % n_sel
            w = ws[m][sel[s]]
            for r in range(c * MATVEC_CHUNK, min(n_rows, (c + 1) * MATVEC_CHUNK)):
                out[m, s, r] = _row_q6_k(w, r, qs, d8, xrow[s])
            i = take_next(counter)


@njit(nogil=True, cache=True, parallel=True)
def matmul_q6_k_q8_k(out, qs, d8, bsums, w, n_par):  # out f32[n_tok, n_rows], qs i8|i16[n_tok, n_cols], d8 f32[n_tok, n_cols//256], bsums i32[n_tok, n_cols//16], w u8[n_rows, row_bytes]
    n_tok, n_rows = out.shape
    nb = qs.shape[1] // QK_K
    chunk = ROW_CHUNK if n_tok > 1 else MATVEC_CHUNK
    n_chunks = (n_rows + chunk - 1) // chunk
    counter = np.zeros(1, np.int64)
    for _ in prange(n_par):  # one task per thread: the decode scratch is allocated once per thread
        buf = decode_scratch(n_tok, nb)
        c = take_next(counter)
        while c < n_chunks:
            r0, r1 = c * chunk, min(n_rows, (c + 1) * chunk)
            if n_tok == 1:  # matvec: fused, the weights never leave registers
                for r in range(r0, r1):
                    out[0, r] = _row_q6_k(w, r, qs, d8, 0)
            else:  # decode the row chunk once, then dot it with every token (same float steps)
                for r in range(r0, r1):
                    for b in range(nb):
                        decode_q6_k(buf, r - r0, b * QK_K, w, r, b * TYPE_SIZE)
                for t in range(n_tok):
                    for r in range(r0, r1):
                        acc = np.float32(0)
                        for b in range(nb):
                            o = b * TYPE_SIZE
                            isum = ws_dot(buf, r - r0, b * QK_K, qs, t, b * QK_K)
                            acc += (d8[t, b] * f16_at(w, r, o + 208)) * np.float32(isum)
                        out[t, r] = acc
            c = take_next(counter)


class KQuant(QuantType):
    """Shared driver for the K-quants: x -> Q8_K once (`prepare`), then the integer kernels.

    Subclasses set `_dequantize(out, w)` and `_kernel(out, qs, d8, bsums, w, n_par)`.
    The kernels trust their shapes (the dot intrinsics do no bounds checks), so
    everything is checked here.
    """

    act_format = "q8_k"

    def _check_weights(self, w, n_rows, n_cols):
        rb = self.row_bytes(n_cols)
        if not (isinstance(w, np.ndarray) and w.dtype == np.uint8 and w.flags.c_contiguous and w.shape == (n_rows, rb)):
            got = f"{w.dtype}{list(w.shape)}" if isinstance(w, np.ndarray) else type(w).__name__
            raise ValueError(f"{self.qtype.name}: weights must be C-contiguous uint8[{n_rows}, {rb}], got {got}")

    def dequantize_into(self, out, w):
        self._check_weights(w, *out.shape)
        self._dequantize(out, w)

    def prepare(self, x):
        """x f32[n_tok, n_cols] -> Q8_K (qs i8[n_tok, n_cols], d8 f32[n_tok, nb], bsums i32[n_tok, n_cols // 16]).

        The kernels also take qs widened to int16 (Q4_K's format): that skips
        the sign extensions but doubles what must stay in L1, which is slower
        for long rows (Q6_K 4096x14336: 13 vs 21 GB/s at one thread).
        """
        if x.ndim != 2 or x.shape[1] % QK_K:
            raise ValueError(f"{self.qtype.name}: activations must be [n_tok, k * {QK_K}], got {x.shape}")
        return q8_k_activation(x)

    def matmul_prepared_into(self, out, act, w):
        """out f32[n_tok, n_rows] = W @ x for x prepared by `prepare`."""
        qs, d8, bsums = act
        n_tok, n_cols = qs.shape
        shapes_ok = out.shape[0] == n_tok and d8.shape == (n_tok, n_cols // QK_K) and bsums.shape == (n_tok, n_cols // 16)
        if qs.dtype not in (np.int8, np.int16) or not shapes_ok:
            raise ValueError(f"{self.qtype.name}: out {out.shape} / activation shapes do not match")
        self._check_weights(w, out.shape[1], n_cols)
        self._kernel(out, qs, d8, bsums, w, numba.get_num_threads())

    # earlier names, still used by tests/test_quant_q6_k.py
    quantize_activation = prepare
    matmul_quantized_into = matmul_prepared_into


class Q6_K(KQuant):
    qtype = GGMLQuantizationType.Q6_K
    _dequantize = staticmethod(dequantize_q6_k)
    _kernel = staticmethod(matmul_q6_k_q8_k)

    def matvec_experts_into(self, out, act, stacks, sel, xrow):
        qs, d8, _ = act
        if (not all(w.ndim == 3 and w.shape[1:] == (out.shape[2], self.row_bytes(qs.shape[1])) and w.flags.c_contiguous
                    for w in stacks) or len(stacks) != out.shape[0] or qs.dtype != np.int8
                or max(sel) >= min(w.shape[0] for w in stacks) or max(xrow) >= qs.shape[0]):
            raise ValueError(f"{self.qtype.name}: expert stacks do not fit out {out.shape} / activation {qs.shape}")
        matvec_experts_q6_k(out, qs, d8, tuple(stacks), sel, xrow, numba.get_num_threads())

    def quantize(self, w):
        from .kquant_quantize import quantize_rows  # kept out of the runtime's import path
        return quantize_rows(self, w)

"""Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: 32-element blocks with an fp16 scale (and min).

Dot products redo ggml's x86 (AVX2 path) vec_dot_*_q8_0 / *_q8_1 operation
for operation, so a matvec row is bit-identical to llama.cpp's vec_dot: x is
quantized to Q8 blocks (q8.py), each block's integer dot is exact, then
scaled by fp16(d_w) * d_x in float32; the _1 types add fp16(m_w) * s_x.

Block layouts (bytes): Q4_0 d|qs[16]  Q4_1 d|m|qs[16]  Q5_0 d|qh[4]|qs[16]
Q5_1 d|m|qh[4]|qs[16]  Q8_0 d|qs[32]. Element j < 16 is the low nibble of
qs[j], element j + 16 the high nibble; qh bit j is the 5th bit of element j.
"""
import llvmlite.binding as ll
import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, config
from numba.extending import intrinsic

from .base import QuantType
from .common import (SERIAL_MACS, FusedExperts, FusedMatvec, fuse_matvec, make_matvec_experts, prefetch_row,
                     rows_ahead, specialise)
from .floats import f16_to_f32
from .q8 import QK8, q8_serial, quantize_activations

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = int(T.Q4_0), int(T.Q4_1), int(T.Q5_0), int(T.Q5_1), int(T.Q8_0)


@njit(inline="always")
def _f16(wr, o):
    return f16_to_f32(np.uint16(wr[o]) | (np.uint16(wr[o + 1]) << np.uint16(8)))


# (block bytes, offset of the 16/32 quant bytes, has min m, has 5th bits qh)
_L4_0, _L4_1, _L5_0, _L5_1, _L8_0 = (18, 2, False, False), (20, 4, True, False), (22, 6, False, True), \
    (24, 8, True, True), (34, 2, False, False)
LAYOUT = {Q4_0: _L4_0, Q4_1: _L4_1, Q5_0: _L5_0, Q5_1: _L5_1, Q8_0: _L8_0}


@njit(inline="always")
def _layout(kind):
    if kind == Q4_0:
        return _L4_0
    if kind == Q4_1:
        return _L4_1
    if kind == Q5_0:
        return _L5_0
    if kind == Q5_1:
        return _L5_1
    return _L8_0


@njit(inline="always")
def _qh(wr, o):
    return (np.uint32(wr[o]) | (np.uint32(wr[o + 1]) << np.uint32(8))
            | (np.uint32(wr[o + 2]) << np.uint32(16)) | (np.uint32(wr[o + 3]) << np.uint32(24)))


# --- fused row dot, emitted as LLVM vector IR -------------------------------
# Written as plain numba loops, LLVM either vectorizes across blocks (byte
# gathers) or not at all. Explicit <32 x i8> IR gives per block what ggml's
# AVX2 code does: one 32-byte load, an int8 dot into 8 int32 lanes
# (vpdpbusd with AVX512-VNNI, else vpmaddwd + add), cvt and one fma.
# One row per call: interleaving 2-4 rows (independent fma chains) measured
# 1.5-2x slower here, as several concurrent read streams per thread are.
I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _vec(t, n):
    return ir.VectorType(t, n)


def _const(t, n, v):
    return ir.Constant(_vec(t, n), [v] * n)


def _shuffle(builder, a, b, idx):
    return builder.shuffle_vector(a, b, ir.Constant(_vec(I32, len(idx)), list(idx)))


def _load(builder, base, off, ty):
    """Unaligned load of type ty at byte/element offset off from base."""
    return builder.load(builder.bitcast(builder.gep(base, [off]), ty.as_pointer()), align=1)


def _block_quants(builder, w, o, kind):
    """The 32 weights of the block at byte o as <32 x i8> integers."""
    _, qo, _, has_qh = LAYOUT[kind]

    def off(k):
        return builder.add(o, ir.Constant(o.type, k))
    if kind == Q8_0:
        return _load(builder, w, off(qo), _vec(I8, 32))
    raw = _load(builder, w, off(qo), _vec(I8, 16))
    q = _shuffle(builder, builder.and_(raw, _const(I8, 16, 15)), builder.lshr(raw, _const(I8, 16, 4)), range(32))
    if has_qh:  # bit j of the little-endian u32 qh is the 5th bit of weight j
        bits = builder.bitcast(_load(builder, w, off(qo - 4), I32), _vec(ir.IntType(1), 32))
        q = builder.or_(q, builder.shl(builder.zext(bits, _vec(I8, 32)), _const(I8, 32, 4)))
    if kind in (Q4_0, Q5_0):
        q = builder.sub(q, _const(I8, 32, 8 if kind == Q4_0 else 16))
    return q


def _fma(builder, a, b, c):
    """a * b + c with one rounding (llvm.fma), for scalars or vectors."""
    name = f"llvm.fma.v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "llvm.fma.f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3), name)
    return builder.call(fn, [a, b, c])


def _has_vnni():
    if config.CPU_NAME and not config.CPU_FEATURES:  # an explicit (e.g. generic) target
        return False
    feats = config.CPU_FEATURES or ll.get_host_cpu_features().flatten()
    return "+avx512vnni" in feats and "+avx512vl" in feats


VNNI = _has_vnni()


def _dot4(builder, a, b):
    """<32 x i8> a, b -> <8 x i32>, lane k = sum of a[j] * b[j] for j in 4k..4k+3 (exact)."""
    if VNNI:  # ggml's trick: |a| as unsigned times b with a's sign, one vpdpbusd
        # (exact while b != -128; Q8 activations are in [-127, 127], NaN input aside, as in ggml)
        neg = builder.icmp_signed("<", a, ir.Constant(a.type, None))
        zero = ir.Constant(a.type, None)
        ua = builder.select(neg, builder.sub(zero, a), a)
        sb = builder.select(neg, builder.sub(zero, b), b)
        v8 = _vec(I32, 8)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8] * 3), "llvm.x86.avx512.vpdpbusd.256")
        return builder.call(fn, [ir.Constant(v8, None), builder.bitcast(ua, v8), builder.bitcast(sb, v8)])
    p = builder.mul(builder.sext(a, _vec(I32, 32)), builder.sext(b, _vec(I32, 32)))
    for n in (16, 8):  # sum adjacent pairs twice (LLVM: vpmaddwd + add)
        p = builder.add(_shuffle(builder, p, p, range(0, 2 * n, 2)), _shuffle(builder, p, p, range(1, 2 * n, 2)))
    return p


def _f16_at(builder, w, o):
    return builder.fpext(builder.bitcast(_load(builder, w, o, I16), ir.HalfType()), F32)


def _make_row_dot(kind):
    bs, _, has_m, _ = LAYOUT[kind]

    @intrinsic
    def row_dot(typingctx, wr, qy, dy, sy):
        """sum_b fp16(d_w) * dy[b] * (q_w . qy)_b [+ fp16(m_w) * sy[b]] over one weight row,
        rounded exactly like ggml's AVX2 vec_dot: 8 float lanes (lane k holds products 4k..4k+3),
        one fma per block and lane, hsum_float_8, then + the fma-accumulated min term."""
        def codegen(context, builder, sig, args):
            w, q, d, s = (context.make_array(t)(context, builder, a) for t, a in zip(sig.args, args))
            acc_p = cgutils.alloca_once_value(builder, ir.Constant(_vec(F32, 8), None))
            summ_p = cgutils.alloca_once_value(builder, ir.Constant(F32, 0.0))
            with cgutils.for_range(builder, builder.extract_value(d.shape, 0)) as loop:
                b = loop.index
                o = builder.mul(b, ir.Constant(b.type, bs))
                dd = builder.fmul(_f16_at(builder, w.data, o), builder.load(builder.gep(d.data, [b])))
                qx = _load(builder, q.data, builder.mul(b, ir.Constant(b.type, QK8)), _vec(I8, 32))
                p = _dot4(builder, _block_quants(builder, w.data, o, kind), qx)
                dv = builder.insert_element(ir.Constant(_vec(F32, 8), ir.Undefined), dd, ir.Constant(I32, 0))
                dv = _shuffle(builder, dv, dv, [0] * 8)
                builder.store(_fma(builder, builder.sitofp(p, _vec(F32, 8)), dv, builder.load(acc_p)), acc_p)
                if has_m:
                    m = _f16_at(builder, w.data, builder.add(o, ir.Constant(o.type, 2)))
                    builder.store(_fma(builder, m, builder.load(builder.gep(s.data, [b])), builder.load(summ_p)), summ_p)
            acc = builder.load(acc_p)
            for n in (4, 2, 1):  # hsum_float_8: high half + low half, then pairs
                acc = builder.fadd(_shuffle(builder, acc, acc, range(n, 2 * n) if n == 4 else range(n)),
                                   _shuffle(builder, acc, acc, range(n) if n == 4 else range(n, 2 * n)))
            return builder.fadd(builder.extract_element(acc, ir.Constant(I32, 0)), builder.load(summ_p))
        return types.float32(wr, qy, dy, sy), codegen
    return row_dot


row_dot_q4_0, row_dot_q4_1, row_dot_q5_0, row_dot_q5_1, row_dot_q8_0 = (
    _make_row_dot(k) for k in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0))


@njit(inline="always")
def _dot_row(wr, qy, dy, sy, kind):  # wr u8[row_bytes], qy i8[n_cols], dy/sy f32[n_cols // 32]
    if kind == Q4_0:
        return row_dot_q4_0(wr, qy, dy, sy)
    if kind == Q4_1:
        return row_dot_q4_1(wr, qy, dy, sy)
    if kind == Q5_0:
        return row_dot_q5_0(wr, qy, dy, sy)
    if kind == Q5_1:
        return row_dot_q5_1(wr, qy, dy, sy)
    return row_dot_q8_0(wr, qy, dy, sy)


@njit(cache=True, nogil=True, parallel=True)
def matvec_q8act(out, qy, dy, sy, w, kind):  # out f32[n_rows], qy i8[n_cols], dy/sy f32[n_cols//32], w u8[n_rows, row_bytes]
    ahead = rows_ahead(w)
    for r in prange(w.shape[0]):
        prefetch_row(w, r, ahead)
        out[r] = _dot_row(w[r], qy, dy, sy, kind)


def _matmul_q8act(out, qy, dy, sy, w, kind):  # template; out f32[n_tok, n_rows], qy i8[n_tok, n_cols], dy/sy f32[n_tok, n_cols//32], w u8[n_rows, row_bytes]
    for r in prange(w.shape[0]):
        wr = w[r]
        for t in range(qy.shape[0]):
            out[t, r] = _dot_row(wr, qy[t], dy[t], sy[t], kind)


matmul_q8act = specialise(_matmul_q8act, "matmul_q8act", _dot_row=_dot_row)
# the same on the calling thread, for small products (SERIAL_MACS): a 256 x 256 Q8_0 matvec took
# 3.3 us so and 7.7 us through a parallel region (2 threads, OMP passive, a busy machine)
matmul_q8act_serial = specialise(_matmul_q8act, "matmul_q8act_serial", parallel=False, _dot_row=_dot_row)


@njit(inline="always")
def _dequant_blocks(wr, outr, kind):
    bs, qo, has_m, has_qh = _layout(kind)
    wi = wr.view(np.int8)
    off = np.float32(8 if kind == Q4_0 else 16 if kind == Q5_0 else 0)
    for b in range(outr.size // QK8):
        o = b * bs
        d = _f16(wr, o)
        m = _f16(wr, o + 2) if has_m else np.float32(0.0)
        qh = _qh(wr, o + qo - 4) if has_qh else np.uint32(0)
        y = outr[b * QK8:(b + 1) * QK8]
        for j in range(QK8):
            if kind == Q8_0:
                q = np.float32(wi[o + qo + j])
            else:
                nib = (wr[o + qo + j % 16] >> np.uint8(4 * (j // 16))) & np.uint8(15)
                q = np.float32(nib | ((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4)) - off
            # same operation order as gguf.quants, so results are bit-exact
            y[j] = d * q + m if has_m else d * q


@njit(cache=True, nogil=True, parallel=True)
def dequantize_legacy(out, w, kind):  # out f32[n_rows, n_cols], w u8[n_rows, row_bytes]
    for r in prange(w.shape[0]):
        if kind == Q4_0:
            _dequant_blocks(w[r], out[r], Q4_0)
        elif kind == Q4_1:
            _dequant_blocks(w[r], out[r], Q4_1)
        elif kind == Q5_0:
            _dequant_blocks(w[r], out[r], Q5_0)
        elif kind == Q5_1:
            _dequant_blocks(w[r], out[r], Q5_1)
        else:
            _dequant_blocks(w[r], out[r], Q8_0)


def _expert_row(kind):
    """make_matvec_experts' row(w, r, act, t) for the legacy type `kind` (act: qy, dy, sy), prefetching as
    matvec_q8act does."""
    @njit(inline="always")
    def row(w, r, act, t):
        prefetch_row(w, r, rows_ahead(w))
        return _dot_row(w[r], act[0][t], act[1][t], act[2][t], kind)
    return row


def _matvec_kind(out, qy, dy, sy, w, n_par):  # template (_Legacy binds KIND); out f32[1, n_rows], qy i8[1, n_cols], dy/sy f32[1, n_cols//32]
    matvec_q8act(out[0], qy[0], dy[0], sy[0], w, KIND)  # noqa: F821 (bound by specialise)


class _Legacy(FusedMatvec, FusedExperts, QuantType):
    act_format = "q8"  # one Q8 format serves the _0 (Q8_0) and _1 (Q8_1) types, see q8.py

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        name = cls.qtype.name.lower()
        kernel = specialise(_matvec_kind, f"matvec_{name}", parallel=False, KIND=int(cls.qtype), matvec_q8act=matvec_q8act)
        cls._matvec_x = staticmethod(fuse_matvec(q8_serial, kernel, f"matvec_x_{name}", cls.qtype))
        cls._experts = staticmethod(make_matvec_experts(_expert_row(int(cls.qtype)), f"matvec_experts_{name}"))
        cls._experts_serial = staticmethod(make_matvec_experts(_expert_row(int(cls.qtype)),
                                                               f"matvec_experts_serial_{name}", parallel=False))

    def dequantize_into(self, out, w):
        dequantize_legacy(out, w, int(self.qtype))

    def prepare(self, x):
        """x f32[n_tok, n_cols] -> Q8 blocks (qs i8[n_tok, n_cols], d f32[n_tok, nb], s f32[n_tok, nb])."""
        return quantize_activations(x)

    def matmul_prepared_into(self, out, act, w):
        self._check(out.shape[1], *act, w)
        if out.size * act[0].shape[-1] <= SERIAL_MACS:
            matmul_q8act_serial(out, *act, w, int(self.qtype))
        elif out.shape[0] == 1:
            matvec_q8act(out[0], *(a[0] for a in act), w, int(self.qtype))
        else:
            matmul_q8act(out, *act, w, int(self.qtype))

    def quantize(self, w):
        from .legacy_quantize import quantize_rows  # kept out of the runtime's import path
        return quantize_rows(self, w)

    def _check(self, n_out, qy, dy, sy, w):
        # the vector kernels read raw memory: shapes and contiguity must be right
        n = qy.shape[-1]
        if w.shape[1] != self.row_bytes(n) or dy.shape[-1] * QK8 != n or n_out != w.shape[0]:
            raise ValueError(f"{self.qtype.name}: activation of {n} does not fit weight rows {w.shape}")
        if not (qy.flags.c_contiguous and dy.flags.c_contiguous and sy.flags.c_contiguous and w.flags.c_contiguous):
            raise ValueError(f"{self.qtype.name}: kernels need C-contiguous arrays")


class Q4_0Type(_Legacy):
    qtype = T.Q4_0


class Q4_1Type(_Legacy):
    qtype = T.Q4_1


class Q5_0Type(_Legacy):
    qtype = T.Q5_0


class Q5_1Type(_Legacy):
    qtype = T.Q5_1


class Q8_0Type(_Legacy):
    qtype = T.Q8_0

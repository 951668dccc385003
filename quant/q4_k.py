"""Q4_K, and the kernels it shares with Q5_K (q5_k.py).

Block of 256 weights, 8 sub-blocks of 32: fp16 d, fp16 dmin, 12 bytes of packed
6-bit (scale, min) pairs, [Q5_K only: qh[32], bit j of qh[l] is the 5th bit of
element l of sub-block j], qs[128]: byte l of 32-byte group g holds element l of
sub-block 2g (low nibble) and of sub-block 2g+1 (high nibble).
Weight = (d * scale_j) * q - dmin * min_j.

Dot products follow ggml's vec_dot_q4_K_q8_K: x is quantized to Q8_K once
(`prepare`: common.py's Q8_K with sums over 32 instead of 16), then per block, in
exact int32 by ggml's AVX2 scheme (numba intrinsics, kquant.Vec.maddubs/madd),
    sumi = sum_j scale_j * (q_j . x8_j)    summ = sum_j min_j * (sum of x8_j)
and in float32  y += (x.d * d) * sumi;  ym += (-x.d * dmin) * summ;  y + ym.
(ggml's own 8-float-lane order was measured 5% faster but moved the deepseek
Q4_K_M logits further from llama.cpp's repacked kernel: NMSE 2.3e-4 > 1e-4.)
"""
import numba
import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange

from .base import QuantType
from .common import (MATVEC_CHUNK, QK_K, FusedExperts, FusedMatvec, fuse_matvec, make_matvec_experts, q8_k_activation,
                     q8_k_serial, read_f16, specialise, take_item, work_counters)
from .kquant import BLOCK_PF_BYTES, I16, I32, SIMD, reduce_lanes, row_dot_scaled, splat, vec


@njit(inline="always")
def _u32(w, r, o):
    return (np.uint32(w[r, o]) | (np.uint32(w[r, o + 1]) << np.uint32(8))
            | (np.uint32(w[r, o + 2]) << np.uint32(16)) | (np.uint32(w[r, o + 3]) << np.uint32(24)))


@njit(inline="always")
def _byte(u, k):
    return np.int32((u >> np.uint32(8 * k)) & np.uint32(255))


@njit(inline="always")
def _scales(w, r, o):
    """The 8 6-bit scales then the 8 mins of the block at w[r, o:], as int32 (for dequantize)."""
    u0, u1, u2 = _u32(w, r, o + 4), _u32(w, r, o + 8), _u32(w, r, o + 12)
    low6, low4, low2 = np.uint32(0x3F3F3F3F), np.uint32(0x0F0F0F0F), np.uint32(0x03030303)
    s03 = u0 & low6
    m03 = u1 & low6
    s47 = (u2 & low4) | (((u0 >> np.uint32(6)) & low2) << np.uint32(4))
    m47 = ((u2 >> np.uint32(4)) & low4) | (((u1 >> np.uint32(6)) & low2) << np.uint32(4))
    return (_byte(s03, 0), _byte(s03, 1), _byte(s03, 2), _byte(s03, 3),
            _byte(s47, 0), _byte(s47, 1), _byte(s47, 2), _byte(s47, 3),
            _byte(m03, 0), _byte(m03, 1), _byte(m03, 2), _byte(m03, 3),
            _byte(m47, 0), _byte(m47, 1), _byte(m47, 2), _byte(m47, 3))


def scales_mins_k4(v, wp):
    """(scales, mins) of the block at wp, <8 x i8> each: 6-bit values packed in its bytes 4..15."""
    if v.vbmi:  # two vpmultishiftqb: the fields of q = bytes 4..15 from its qwords q[0:8] and q[4:12]
        i64, b = ir.IntType(64), v.b
        a8, b8 = (b.bitcast(v.rep(v.load(wp, o, 1, i64), 2), vec(ir.IntType(8), 16)) for o in (4, 8))
        # j < 4: scale j = q[j] & 63, min j = q[j + 4] & 63; j >= 4: the low 4 bits from q[j + 4] (scale:
        # low nibble, min: high), the high 2 from bits 6-7 of q[j - 4] (scale) or q[j] (min)
        hi = v.multishift([8 * j for j in range(4)] + [8 * (j - 4) + 2 for j in range(4, 8)]
                          + [8 * (j + 4) for j in range(4)] + [8 * j + 2 for j in range(4, 8)], a8)
        lo = v.multishift([0] * 4 + [8 * j for j in range(4, 8)] + [0] * 4 + [8 * j + 4 for j in range(4, 8)], b8)
        both = b.or_(v.mask(hi, ([63] * 4 + [48] * 4) * 2), v.mask(lo, ([0] * 4 + [15] * 4) * 2))
        return v.shuffle(both, both, list(range(8))), v.shuffle(both, both, list(range(8, 16)))
    b, p = v.b, v.load(wp, 4, 12)
    low6, top2 = [63] * 4 + [15] * 4, [0] * 4 + [48] * 4  # values 4..7 take 4 bits here, 2 from bits 6-7 of 0..3
    top = v.shl(v.shr(p, 6), 4)
    sc = b.or_(v.mask(v.shuffle(p, p, [0, 1, 2, 3, 8, 9, 10, 11]), low6),
               v.mask(v.shuffle(top, top, [0, 1, 2, 3] * 2), top2))
    lo = v.shr(v.shuffle(p, p, [4, 5, 6, 7, 8, 9, 10, 11]), [0] * 4 + [4] * 4)
    mn = b.or_(v.mask(lo, low6), v.mask(v.shuffle(top, top, [4, 5, 6, 7] * 2), top2))
    return sc, mn


def lanes_k45(five):
    """Emitter of the <8 x i32> lanes of sum_j scale_j * (q_j . x8_j) over the block's 8 sub-blocks
    (lane k: elements e with e % 32 in 4k..4k+3), exact: ggml's AVX2 scheme (Vec.maddubs/madd)
    on v.width // 32 sub-blocks at a time."""
    qo = 48 if five else 16  # offset of qs in the block

    def emit(v, wp, qp, q8_dtype):
        b, h = v.b, v.width // 32
        sc16 = v.zext(scales_mins_k4(v, wp)[0], I16)
        qh = v.rep(v.load(wp, 16, 32), h) if five else None
        acc = splat(I32, 8 * h, 0)
        for j in range(0, 8, h):
            js = range(j, j + h)  # sub-block j: nibble j % 2 of qs[32 * (j // 2):], bit j of qh
            q = v.rep(v.load(wp, qo + 32 * (j // 2), 32), h)
            if v.vbmi:  # the nibble in one vgf2p8affineqb
                u = v.bit_select(q, [[4 * (k % 2) + i for i in range(4)] for k in js for _ in range(4)])
            else:
                u = v.mask(v.shr16(q, [4 * (k % 2) for k in js]), 15)
            if five:
                u = b.or_(u, v.shl(v.mask(v.shr16(qh, list(js)), 1), 4))
            x = v.load_q8(qp, 32 * j, 32 * h, q8_dtype)
            sc = v.shuffle(sc16, sc16, [k for k in js for _ in range(16)])
            acc = b.add(acc, v.madd(v.maddubs(u, x), sc))  # |pair sums| <= 2 * 31 * 127: no saturation
        return v.fold8(acc)
    return emit


def sum_lanes_k45(v, wp, qp, bp, q8_dtype, lanes):
    """[sumi lanes, summ lanes] of the block at wp: the block's `lanes`, then min_j * s_j in vpmaddwd pairs
    (s: the activation's 32-sums at bp); each vector's lanes sum exactly to sumi or summ."""
    sums = v.b.trunc(v.load(bp, 0, 8, I32), vec(I16, 8))  # the 32-sums fit int16 (32 * 127): vpmaddwd
    return [lanes(v, wp, qp, q8_dtype), v.madd(v.zext(scales_mins_k4(v, wp)[1], I16), sums)]


def block_sums_k45(v, wp, qp, bp, q8_dtype, lanes):
    """(sumi, summ) i32 of the block at wp and the activation's quants at qp and 32-sums at bp."""
    s = reduce_lanes(v, sum_lanes_k45(v, wp, qp, bp, q8_dtype, lanes))
    return tuple(v.b.extract_element(s, ir.Constant(I32, i)) for i in range(2))


def row_dot_k45(five, simd=SIMD, pf=0):
    """Intrinsic dot(w, r, qs, bs32, d8, t) -> f32: row r of w dotted with token t of the activation (quants qs,
    32-sums bs32, scales d8), in float32 without fma, per block y += (d8 * d) * sumi, ym += (-d8 * dmin) * summ;
    then y + ym (kquant.row_dot_scaled; pf: see kquant.block_loop). Unchecked indices."""
    lanes = lanes_k45(five)
    return row_dot_scaled(lambda v, wp, qp, bp, q8_dtype: sum_lanes_k45(v, wp, qp, bp, q8_dtype, lanes),
                          176 if five else 144, 0, (1, -1), 8, simd, pf)


def _matvec(out, xq, d8, bs32, w, n_par):  # template (make_kernels binds `row`); out f32[1, n_rows], xq i8[1, n], d8 f32[1, n//256], bs32 i32[1, n//32], w u8[n_rows, row_bytes]; n_par threads
    n_rows = w.shape[0]
    n_chunks = (n_rows + MATVEC_CHUNK - 1) // MATVEC_CHUNK
    counters = work_counters(n_par)
    for p in prange(n_par):  # chunks of rows, taken dynamically (common.take_item)
        c = take_item(counters, p, n_chunks, n_par)
        while c >= 0:
            for r in range(c * MATVEC_CHUNK, min(n_rows, (c + 1) * MATVEC_CHUNK)):
                out[0, r] = row(w, r, xq, bs32, d8, 0)  # noqa: F821 (bound by specialise)
            c = take_item(counters, p, n_chunks, n_par)


def _matmul(out, xq, d8, bs32, w):  # template (make_kernels binds `row`); out f32[n_tok, n_rows], xq i8[n_tok, n], d8 f32[n_tok, n//256], bs32 i32[n_tok, n//32], w u8[n_rows, row_bytes]
    # per token the same float32 operations as matvec: bit-identical results
    for r in prange(w.shape[0]):
        for t in range(out.shape[0]):
            out[t, r] = row(w, r, xq, bs32, d8, t)  # noqa: F821 (bound by specialise)


def make_kernels(five):
    """(matvec, matmul, dequantize, matvec_experts, matvec_x) njit kernels for Q4_K (five=False) or Q5_K.

    `five` and the block size are closure constants, compiled in."""
    ts = 176 if five else 144
    qo = 48 if five else 16  # offset of qs in the block
    row = row_dot_k45(five, pf=BLOCK_PF_BYTES)
    tag = "q5_k" if five else "q4_k"
    matvec, matmul = (specialise(f, f"{f.__name__[1:]}_{tag}", row=row) for f in (_matvec, _matmul))

    @njit(inline="always")
    def expert_row(w, r, act, t):  # act: (qs, d8, bs32)
        return row(w, r, act[0], act[2], act[1], t)

    @njit(cache=True, nogil=True, parallel=True)
    def dequantize(out, w):  # out f32[n_rows, n_cols], w u8[n_rows, row_bytes]
        for r in prange(out.shape[0]):
            for b in range(out.shape[1] // QK_K):
                o = b * ts
                d = read_f16(w, r, o)
                dmin = read_f16(w, r, o + 2)
                sc = _scales(w, r, o)
                for j in range(8):
                    # gguf-py's order: (d * scale) * q - (dmin * min), float32, no fma
                    dl = d * np.float32(sc[j])
                    ml = dmin * np.float32(sc[8 + j])
                    g = o + qo + 32 * (j >> 1)
                    sh = 4 * (j & 1)
                    for l in range(32):
                        q = (w[r, g + l] >> sh) & 15
                        if five:
                            q |= ((w[r, o + 16 + l] >> j) & 1) << 4
                        out[r, b * QK_K + 32 * j + l] = dl * np.float32(q) - ml

    experts = make_matvec_experts(expert_row, f"matvec_experts_{tag}")
    return matvec, matmul, dequantize, experts, fuse_matvec(q8_k32, matvec, f"matvec_x_{tag}",
                                                       GGMLQuantizationType.Q5_K if five else GGMLQuantizationType.Q4_K)


@njit(inline="always")
def q8_k32(x):  # x f32[n_tok, n] -> KQuant45's prepared activation, on this thread
    return q8_k_serial(x, 32)


class KQuant45(FusedMatvec, FusedExperts, QuantType):
    """Driver shared by Q4_K and Q5_K; subclasses set `kernels = make_kernels(five)`.

    `prepare` gives x as Q8_K with 32-sums (act_format "q8_k32"), for any
    number of `matmul_prepared_into` calls."""

    act_format = "q8_k32"
    kernels: tuple

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls._matvec_x, cls._experts = staticmethod(cls.kernels[4]), staticmethod(cls.kernels[3])

    def dequantize_into(self, out, w):
        self.kernels[2](out, w)

    def prepare(self, x):
        return q8_k_activation(x, 32)

    def matmul_prepared_into(self, out, act, w):
        """out f32[n_tok, n_rows] = W @ x for x prepared by `prepare` (one token: the matvec kernel)."""
        n_tok, n_cols = out.shape[0], w.shape[1] // self.type_size * self.block_size
        qs, d8, bs32 = act
        if (out.shape[1] != w.shape[0] or qs.shape != (n_tok, n_cols) or qs.dtype != np.int8
                or d8.shape != (n_tok, n_cols // QK_K) or bs32.shape != (n_tok, n_cols // 32)):
            raise ValueError(f"{self.qtype.name}: activation of {act[0].shape} and output of {out.shape} "
                             f"do not fit weights of {w.shape[0]} x {n_cols}")
        if n_tok == 1:
            self.kernels[0](out, *act, w, numba.get_num_threads())
        else:
            self.kernels[1](out, *act, w)


class Q4_K(KQuant45):
    qtype = GGMLQuantizationType.Q4_K
    kernels = make_kernels(False)

    def quantize(self, w):
        from .kquant_quantize import quantize_rows  # kept out of the runtime's import path
        return quantize_rows(self, w)

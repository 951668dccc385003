"""Q6_K: 256 weights per block, 16 groups of 16 with an int8 scale each.

Block (210 bytes): ql[128] low nibbles, qh[64] high 2-bit pairs, scales i8[16]
(one per 16 weights), d fp16. Weight = d * scale * (q - 32).
Element 128h + 32k + l (l < 32): low nibble k // 2 of ql[64h + 32(k % 2) + l],
high bits 2k of qh[32h + l].

matvec fuses decode and dot (sums_q6_k, pair products); matmul decodes each row once
to int16 and dots it with every token.
"""
import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange

from .common import MATVEC_CHUNK, QK_K, fuse_matvec, make_matvec_experts, read_f16, take_item, work_counters
from .kquant import (BLOCK_PF_BYTES, I16, I32, ROW_CHUNK, KQuant, block_decode, decode_scratch, f16_at, group_scales,
                     q8_k16, reduce_lanes, row_dot_scaled, splat, vec, ws_dot)

TYPE_SIZE = 210


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


decode_q6_k = block_decode(weights_q6_k)


def lanes_q6_k(v, wp, qp, bp, q8_dtype):
    """[<8 x i32>] whose lanes sum exactly to the int32 sum of scale * (q - 32) * x8 over the block at wp, for
    the Q8_K quants at qp and their 16-sums at bp: ggml's AVX2 pair products (Vec.maddubs/madd) on the unsigned
    q, v.width // 32 chunks of 32 at a time, minus 32 * scale_g * bsum_g (vpmaddwd pairs) once per block."""
    b, h = v.b, v.width // 32
    sc16 = v.opaque(v.sext(v.load(wp, 192, 16), I16))
    acc = splat(I32, 8 * h, 0)
    for hh in range(2):
        qh = v.rep(v.load(wp, 128 + 32 * hh, 32), h)
        for k in range(0, 4, h):  # chunk c = 4 * hh + k: low nibble k // 2 of ql[64hh + 32(k % 2):], bits 2k of qh
            ks = range(k, k + h)
            ql = v.load(wp, 64 * hh + 32 * (k % 2), 32 * h)
            if v.vbmi:  # the nibble and the two high bits (to bits 4-5), a vgf2p8affineqb each
                lo = v.bit_select(ql, [[4 * (k // 2) + i for i in range(4)]])
                hi = v.bit_select(qh, [[None] * 4 + [2 * j, 2 * j + 1] for j in ks for _ in range(4)])
            else:
                lo = v.mask(v.shr16(ql, [4 * (k // 2)] * h), 15)
                hi = v.mask(v.shl16(qh, [4 - 2 * j for j in ks]) if k < 2 else v.shr16(qh, [2 * j - 4 for j in ks]), 48)
            x = v.load_q8(qp, 32 * (4 * hh + k), 32 * h, q8_dtype)
            sc = v.shuffle(sc16, sc16, [2 * (4 * hh + j) + i // 8 for j in ks for i in range(16)])
            acc = b.add(acc, v.madd(v.maddubs(b.or_(lo, hi), x), sc))  # |pair sums| <= 2 * 63 * 127
    bs = b.trunc(v.load(bp, 0, 16, I32), vec(I16, 16))  # |16-sums| <= 16 * 127 fit int16
    return [b.sub(v.fold8(acc), v.shl(v.madd(sc16, bs), 5))]


def sums_q6_k(v, wp, qp, bp, q8_dtype):
    """The exact int32 sum of scale * (q - 32) * x8 over the block at wp (the sum of its `lanes_q6_k`)."""
    return v.b.extract_element(reduce_lanes(v, lanes_q6_k(v, wp, qp, bp, q8_dtype)), ir.Constant(I32, 0))


# acc += (d8 * d) * isum per block (isum: lanes_q6_k's sum), in float32 without fma
row_q6_k = row_dot_scaled(lanes_q6_k, TYPE_SIZE, 208, (1,), 16, pf=BLOCK_PF_BYTES)


@njit(inline="always")
def _row(w, r, act, t):  # act: (qs, d8, bsums)
    return row_q6_k(w, r, act[0], act[2], act[1], t)


matvec_experts_q6_k = make_matvec_experts(_row, "matvec_experts_q6_k")


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


@njit(nogil=True, cache=True, parallel=True)
def matmul_q6_k_q8_k(out, qs, d8, bsums, w, n_par):  # out f32[n_tok, n_rows], qs i8|i16[n_tok, n_cols], d8 f32[n_tok, n_cols//256], bsums i32[n_tok, n_cols//16], w u8[n_rows, row_bytes]
    n_tok, n_rows = out.shape
    nb = qs.shape[1] // QK_K
    chunk = ROW_CHUNK if n_tok > 1 else MATVEC_CHUNK
    n_chunks = (n_rows + chunk - 1) // chunk
    counters = work_counters(n_par)
    for p in prange(n_par):  # one task per thread: the decode scratch is allocated once per thread
        buf = decode_scratch(n_tok, nb)
        c = take_item(counters, p, n_chunks, n_par)
        while c >= 0:
            r0, r1 = c * chunk, min(n_rows, (c + 1) * chunk)
            if n_tok == 1:  # matvec: fused, the weights never leave registers
                for r in range(r0, r1):
                    out[0, r] = row_q6_k(w, r, qs, bsums, d8, 0)
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
            c = take_item(counters, p, n_chunks, n_par)


class Q6_K(KQuant):
    qtype = GGMLQuantizationType.Q6_K
    _dequantize = staticmethod(dequantize_q6_k)
    _kernel = staticmethod(matmul_q6_k_q8_k)
    _matvec_x = staticmethod(fuse_matvec(q8_k16, matmul_q6_k_q8_k, "matvec_x_q6_k", GGMLQuantizationType.Q6_K))
    _experts = staticmethod(matvec_experts_q6_k)

    def quantize(self, w):
        from .kquant_quantize import quantize_rows  # kept out of the runtime's import path
        return quantize_rows(self, w)

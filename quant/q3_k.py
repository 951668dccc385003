"""Q3_K: 256 weights per block, 16 groups of 16 with a 6-bit scale each.

Block (110 bytes): hmask[32] high bits, qs[64] low 2-bit pairs, scales[12]
(16 packed 6-bit values), d fp16. Weight = d * (scale - 32) * q, with
q = low2 - 4 where the hmask bit is clear, low2 where it is set.
Element 128n + 32j + l takes bits 2j of qs[32n + l] and bit 4n + j of hmask[l].
"""
import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange

from .common import MATVEC_CHUNK, QK_K, fuse_matvec, make_matvec_experts, read_f16, take_item, work_counters
from .kquant import (BLOCK_PF_BYTES, I16, I32, I8, ROW_CHUNK, KQuant, block_decode, decode_scratch, f16_at,
                     group_scales, q8_k16, row_dot_lanes, splat, vec, ws_dot)

TYPE_SIZE = 110
# llama.cpp multiplies batches of >= 8 tokens with its "tiled" kernel (ggml-cpu/tiled), whose
# float steps differ from vec_dot_q3_K_q8_K's; we follow whichever llama.cpp would run
TILED_MIN_BATCH = 8


@njit(inline="always")
def _scales(sc16, blk):
    """sc16 i16[16] <- the signed scales (6-bit value - 32) packed in blk[96:108].

    Scale s: low 4 bits from nibble s // 8 of byte s % 8, high 2 bits from
    bits 2 * (s // 4) of byte 8 + s % 4.
    """
    for i in range(4):
        h = np.int32(blk[104 + i])
        a = np.int32(blk[96 + i])
        c = np.int32(blk[100 + i])
        sc16[i] = np.int16(((a & 15) | ((h & 3) << 4)) - 32)
        sc16[i + 4] = np.int16(((c & 15) | ((h & 12) << 2)) - 32)
        sc16[i + 8] = np.int16(((a >> 4) | (h & 48)) - 32)
        sc16[i + 12] = np.int16(((c >> 4) | ((h >> 2) & 48)) - 32)


@njit(nogil=True, cache=True, parallel=True)
def dequantize_q3_k(out, w):  # out f32[n_rows, n_cols], w u8[n_rows, row_bytes]
    nb = out.shape[1] // QK_K
    for r in prange(out.shape[0]):
        sc16 = np.empty(16, np.int16)
        for b in range(nb):
            o = b * TYPE_SIZE
            blk = w[r, o:o + TYPE_SIZE]
            _scales(sc16, blk)
            d = read_f16(w, r, o + 108)
            for e in range(QK_K):
                n, j, l = e >> 7, (e >> 5) & 3, e & 31
                q = (np.int32(blk[32 + 32 * n + l]) >> (2 * j)) & 3
                if not (np.int32(blk[l]) >> (4 * n + j)) & 1:
                    q -= 4
                # gguf-py: (d * float(scale)) * float(q), in float32
                out[r, b * QK_K + e] = (d * np.float32(sc16[e >> 4])) * np.float32(q)


def scales_q3_k(v, wp):
    """<16 x i16>: the block's 16 signed scales (6-bit value - 32)."""
    # scale s: low 4 bits from nibble s // 8 of byte 96 + s % 8, high 2 from bits 2 * (s // 4) of byte 104 + s % 4
    if v.vbmi:  # two vpmultishiftqb cut both fields out of the packed bytes, the high bits landing at bits 4-5
        i64 = ir.IntType(64)
        lo8, hi8 = (v.b.bitcast(v.rep(v.load(wp, o, 1, i64), 2), vec(I8, 16)) for o in (96, 100))
        lo = v.multishift([8 * (s % 8) + 4 * (s // 8) for s in range(16)], lo8)
        hi = v.multishift([(32 + 8 * (s % 4) + 2 * (s // 4) - 4) % 64 for s in range(16)], hi8)
        return v.sext(v.sub(v.b.or_(v.mask(lo, 15), v.mask(hi, 48)), 32), I16)
    lo8 = v.load(wp, 96, 8)
    lo = v.shuffle(v.mask(lo8, 15), v.shr(lo8, 4), list(range(16)))
    hb = v.load(wp, 104, 4)
    hi = v.mask(v.shr(v.shuffle(hb, hb, [0, 1, 2, 3] * 4), [0] * 4 + [2] * 4 + [4] * 4 + [6] * 4), 3)
    return v.sext(v.sub(v.b.or_(lo, v.shl(hi, 4)), 32), I16)


def weights_q3_k(v, wp):
    """The block's integer weights (scale - 32) * q, as eight <32 x i16> chunks in element order."""
    b = v.b
    sc16 = scales_q3_k(v, wp)
    hm = v.load(wp, 0, 32)
    chunks = []
    for n in range(2):
        q2 = v.load(wp, 32 + 32 * n, 32)
        for j in range(4):
            # q = low2 - 4, plus 4 where the hmask bit is set
            high = v.shl(v.mask(v.shr(hm, 4 * n + j), 1), 2)
            q = v.sub(b.or_(v.mask(v.shr(q2, 2 * j), 3), high), 4)
            chunks.append(b.mul(v.sext(q, I16), group_scales(v, sc16, 8 * n + 2 * j)))
    return chunks


def lanes_q3_k(v, wp, qp, q8_dtype):
    """<8 x i32>, lane k the exact sum of weight * q8 over the block's elements e with e % 32 in 4k..4k+3: the
    lanes of ggml's AVX2 vec_dot_q3_K_q8_K, by Vec.maddubs/madd on v.width // 32 chunks of 32 elements at a
    time. u = low2 + 4 * hbit is unsigned, q = u - 4: q . x = u . x - 4 . x (measured 10% faster than
    ggml's low2 . x - (4 where the bit is clear) . x)."""
    b, h = v.b, v.width // 32
    sc16 = v.opaque(scales_q3_k(v, wp))
    hm = v.rep(v.load(wp, 0, 32), h)
    hm4 = None if v.vbmi else v.shl16(hm, 2)  # bits 0, 1 at bits 2, 3 (bits 6, 7 of odd bytes: lost, unused)
    four = splat(I8, 32 * h, 4)
    acc = splat(I32, 8 * h, 0)
    for n in range(2):
        q2 = v.rep(v.load(wp, 32 + 32 * n, 32), h)
        for j in range(0, 4, h):
            cs = range(4 * n + j, 4 * n + j + h)  # chunk c: elements 32c..32c+31, hmask bit c
            x = v.load_q8(qp, 32 * cs[0], 32 * h, q8_dtype)
            if v.vbmi:  # u's bits 0-1 from bits 2c % 8 of q2, bit 2 from bit c of hm: a vgf2p8affineqb each
                lo = v.bit_select(q2, [[2 * (c % 4), 2 * (c % 4) + 1] for c in cs for _ in range(4)])
                u = b.or_(lo, v.bit_select(hm, [[None, None, c] for c in cs for _ in range(4)]))
            else:  # hmask bit c shifted to bit 2 (= 4 * hbit) in one right shift
                hb = v.shr16(hm4, list(cs)) if cs[0] < 2 else v.shr16(hm, [c - 2 for c in cs])
                u = b.or_(v.mask(v.shr16(q2, [2 * (c % 4) for c in cs]), 3), v.mask(hb, 4))
            p16 = b.sub(v.maddubs(u, x), v.maddubs(four, x))  # |pair sums| <= 2 * 7 * 127: no saturation
            sc = v.shuffle(sc16, sc16, [2 * c + k // 8 for c in cs for k in range(16)])
            acc = b.add(acc, v.madd(p16, sc))
    return v.fold8(acc)


decode_q3_k = block_decode(weights_q3_k)
# vec_dot_q3_K_q8_K of row r and token t, fused: the weights never leave registers
row_q3_k = row_dot_lanes(lanes_q3_k, TYPE_SIZE, 108, pf=BLOCK_PF_BYTES)


@njit(inline="always")
def _row(w, r, act, t):  # act: (qs, d8)
    return row_q3_k(w, r, act[0], act[1], t)


matvec_experts_q3_k = make_matvec_experts(_row, "matvec_experts_q3_k")


@njit(nogil=True, cache=True, parallel=True)
def matmul_q3_k_q8_k(out, qs, d8, bsums, w, n_par):  # out f32[n_tok, n_rows], qs i8|i16[n_tok, n_cols], d8 f32[n_tok, n_cols//256], bsums i32[n_tok, n_cols//16], w u8[n_rows, row_bytes]
    n_tok, n_rows = out.shape
    nb = qs.shape[1] // QK_K
    chunk = ROW_CHUNK if n_tok > 1 else MATVEC_CHUNK
    n_chunks = (n_rows + chunk - 1) // chunk
    tiled = n_tok >= TILED_MIN_BATCH
    counters = work_counters(n_par)
    for p in prange(n_par):  # one task per thread: the decode scratch is allocated once per thread
        buf = decode_scratch(n_tok if tiled else 1, nb)
        c = take_item(counters, p, n_chunks, n_par)
        while c >= 0:
            r0, r1 = c * chunk, min(n_rows, (c + 1) * chunk)
            if not tiled:  # vec_dot_q3_K_q8_K per token
                for t in range(n_tok):
                    for r in range(r0, r1):
                        out[t, r] = row_q3_k(w, r, qs, d8, t)
            else:  # decode the row chunk once for all tokens; the tiled kernel's per-block float steps
                for r in range(r0, r1):
                    for b in range(nb):
                        decode_q3_k(buf, r - r0, b * QK_K, w, r, b * TYPE_SIZE)
                for t in range(n_tok):
                    for r in range(r0, r1):
                        acc = np.float32(0)
                        for b in range(nb):
                            isum = ws_dot(buf, r - r0, b * QK_K, qs, t, b * QK_K)
                            acc += (np.float32(isum) * f16_at(w, r, b * TYPE_SIZE + 108)) * d8[t, b]
                        out[t, r] = acc
            c = take_item(counters, p, n_chunks, n_par)


class Q3_K(KQuant):
    qtype = GGMLQuantizationType.Q3_K
    _dequantize = staticmethod(dequantize_q3_k)
    _kernel = staticmethod(matmul_q3_k_q8_k)
    _matvec_x = staticmethod(fuse_matvec(q8_k16, matmul_q3_k_q8_k, "matvec_x_q3_k", GGMLQuantizationType.Q3_K))
    _experts = staticmethod(matvec_experts_q3_k)

    def quantize(self, w):
        from .kquant_quantize import quantize_rows  # kept out of the runtime's import path
        return quantize_rows(self, w)

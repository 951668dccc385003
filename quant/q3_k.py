"""Q3_K: 256 weights per block, 16 groups of 16 with a 6-bit scale each.

Block (110 bytes): hmask[32] high bits, qs[64] low 2-bit pairs, scales[12]
(16 packed 6-bit values), d fp16. Weight = d * (scale - 32) * q, with
q = low2 - 4 where the hmask bit is clear, low2 where it is set.
Element 128n + 32j + l takes bits 2j of qs[32n + l] and bit 4n + j of hmask[l].
"""
import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .common import QK_K, read_f16
from .q6_k import (I16, ROW_CHUNK, KQuant, block_decode, block_dot, decode_scratch, f16_at, group_scales,
                   ws_dot)

TYPE_SIZE = 110


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


def weights_q3_k(v, wp):
    """The block's integer weights (scale - 32) * q, as eight <32 x i16> chunks in element order."""
    b = v.b
    # 16 six-bit scales: low nibbles of bytes 96..103 then their high nibbles,
    # high 2 bits from bytes 104..107 at bit 2 * (s // 4)
    lo8 = v.load(wp, 96, 8)
    lo = v.shuffle(v.mask(lo8, 15), v.shr(lo8, 4), list(range(16)))
    hb = v.load(wp, 104, 4)
    hi = v.mask(v.shr(v.shuffle(hb, hb, [0, 1, 2, 3] * 4), [0] * 4 + [2] * 4 + [4] * 4 + [6] * 4), 3)
    sc16 = v.sext(v.sub(b.or_(lo, v.shl(hi, 4)), 32), I16)
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


dot_q3_k_q8_k = block_dot(weights_q3_k)
decode_q3_k = block_decode(weights_q3_k)


@njit(nogil=True, cache=True, parallel=True)
def matmul_q3_k_q8_k(out, qs, d8, bsums, w, n_par):  # out f32[n_tok, n_rows], qs i8|i16[n_tok, n_cols], d8 f32[n_tok, n_cols//256], bsums i32[n_tok, n_cols//16], w u8[n_rows, row_bytes]
    n_tok, n_rows = out.shape
    nb = qs.shape[1] // QK_K
    n_chunks = (n_rows + ROW_CHUNK - 1) // ROW_CHUNK
    for p in prange(n_par):  # one task per thread: the decode scratch is allocated once per thread
        buf = decode_scratch(n_tok, nb)
        for c in range(p, n_chunks, n_par):
            r0, r1 = c * ROW_CHUNK, min(n_rows, (c + 1) * ROW_CHUNK)
            if n_tok == 1:  # matvec: fused
                for r in range(r0, r1):
                    acc = np.float32(0)
                    for b in range(nb):
                        o = b * TYPE_SIZE
                        isum = dot_q3_k_q8_k(w, r, o, qs, 0, b * QK_K)
                        acc += (d8[0, b] * f16_at(w, r, o + 108)) * np.float32(isum)
                    out[0, r] = acc
            else:  # decode the row chunk once for all tokens (as in q6_k)
                for r in range(r0, r1):
                    for b in range(nb):
                        decode_q3_k(buf, r - r0, b * QK_K, w, r, b * TYPE_SIZE)
                for t in range(n_tok):
                    for r in range(r0, r1):
                        acc = np.float32(0)
                        for b in range(nb):
                            o = b * TYPE_SIZE
                            isum = ws_dot(buf, r - r0, b * QK_K, qs, t, b * QK_K)
                            acc += (d8[t, b] * f16_at(w, r, o + 108)) * np.float32(isum)
                        out[t, r] = acc


class Q3_K(KQuant):
    qtype = GGMLQuantizationType.Q3_K
    _dequantize = staticmethod(dequantize_q3_k)
    _kernel = staticmethod(matmul_q3_k_q8_k)

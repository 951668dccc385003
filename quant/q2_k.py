"""Q2_K: 256 weights per block, 16 groups of 16 with a 4-bit scale and 4-bit min.

Block (84 bytes): scales[16] (low nibble scale, high nibble min), qs[64] 2-bit
quants, d fp16, dmin fp16. Weight = d * scale * q - dmin * min.
Element 128n + 32j + l takes bits 2j of qs[32n + l].
"""
import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange, types
from numba.extending import intrinsic

from .common import QK_K, fuse_matvec, read_f16
from .kquant import (I16, I32, ROW_CHUNK, KQuant, Vec, block_decode, block_dot, c_matrix, decode_scratch, f16_at,
                     group_scales, q8_k16, row_ptr, vec, ws_dot)

TYPE_SIZE = 84


@njit(nogil=True, cache=True, parallel=True)
def dequantize_q2_k(out, w):  # out f32[n_rows, n_cols], w u8[n_rows, row_bytes]
    nb = out.shape[1] // QK_K
    for r in prange(out.shape[0]):
        for b in range(nb):
            o = b * TYPE_SIZE
            d = read_f16(w, r, o + 80)
            dmin = read_f16(w, r, o + 82)
            for e in range(QK_K):
                n, j, l = e >> 7, (e >> 5) & 3, e & 31
                q = (np.int32(w[r, o + 16 + 32 * n + l]) >> (2 * j)) & 3
                sc = np.int32(w[r, o + (e >> 4)])
                # gguf-py: (d * scale) * q - (dmin * min), in float32
                dl = d * np.float32(sc & 0xF)
                ml = dmin * np.float32(sc >> 4)
                out[r, b * QK_K + e] = dl * np.float32(q) - ml


def weights_q2_k(v, wp):
    """The block's integer weights scale * q (mins apart), as eight <32 x i16> chunks in element order."""
    sc16 = v.sext(v.mask(v.load(wp, 0, 16), 15), I16)
    chunks = []
    for n in range(2):
        q2 = v.load(wp, 16 + 32 * n, 32)
        for j in range(4):
            chunks.append(v.b.mul(v.sext(v.mask(v.shr(q2, 2 * j), 3), I16), group_scales(v, sc16, 8 * n + 2 * j)))
    return chunks


# scale * q <= 45: shifted by 8 (sum <= 256 * 45 * 256 * 127 < 2^31) so LLVM keeps 16-bit products
dot_q2_k_q8_k = block_dot(weights_q2_k, shift=8)
decode_q2_k = block_decode(weights_q2_k)


@intrinsic
def mins_q2_k(typingctx, w, r, o, bsums, t, bo):
    """Exact sum over the 16 groups of min * bsum for the Q2_K block at w[r, o:] and the
    Q8_K 16-sums bsums[t, bo:bo+16] (ggml's min term). Unchecked indices."""
    def codegen(context, builder, sig, args):
        v = Vec(builder)
        wp, bp = row_ptr(context, builder, sig, args, 0), row_ptr(context, builder, sig, args, 3)
        # |bsum| <= 16 * 127 fits int16 (ggml stores it so): an i16 x i16 product LLVM can pair up
        bs = v.sext(builder.trunc(v.load(bp, 0, 16, I32), vec(I16, 16)), I32)
        return v.reduce_add(builder.mul(v.zext(v.shr(v.load(wp, 0, 16), 4), I32), bs))
    if c_matrix(w, bsums):
        return types.int32(w, r, o, bsums, t, bo), codegen


@njit(inline="always")
def _block(acc, w, r, b, d8, bsums, t, isum):
    """acc + this block's float contribution, ggml's dall * isum - dmin * summs."""
    o = b * TYPE_SIZE
    dall = d8[t, b] * f16_at(w, r, o + 80)
    dmin = d8[t, b] * f16_at(w, r, o + 82)
    return acc + (dall * np.float32(isum) - dmin * np.float32(mins_q2_k(w, r, o, bsums, t, 16 * b)))


@njit(nogil=True, cache=True, parallel=True)
def matmul_q2_k_q8_k(out, qs, d8, bsums, w, n_par):  # out f32[n_tok, n_rows], qs i8|i16[n_tok, n_cols], d8 f32[n_tok, n_cols//256], bsums i32[n_tok, n_cols//16], w u8[n_rows, row_bytes]
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
                        acc = _block(acc, w, r, b, d8, bsums, 0, dot_q2_k_q8_k(w, r, b * TYPE_SIZE, qs, 0, b * QK_K))
                    out[0, r] = acc
            else:  # decode the row chunk once for all tokens (as in q6_k)
                for r in range(r0, r1):
                    for b in range(nb):
                        decode_q2_k(buf, r - r0, b * QK_K, w, r, b * TYPE_SIZE)
                for t in range(n_tok):
                    for r in range(r0, r1):
                        acc = np.float32(0)
                        for b in range(nb):
                            acc = _block(acc, w, r, b, d8, bsums, t, ws_dot(buf, r - r0, b * QK_K, qs, t, b * QK_K))
                        out[t, r] = acc


class Q2_K(KQuant):
    qtype = GGMLQuantizationType.Q2_K
    _dequantize = staticmethod(dequantize_q2_k)
    _kernel = staticmethod(matmul_q2_k_q8_k)
    _matvec_x = staticmethod(fuse_matvec(q8_k16, matmul_q2_k_q8_k, "matvec_x_q2_k", GGMLQuantizationType.Q2_K))

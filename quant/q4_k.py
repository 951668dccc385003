"""Q4_K, and the kernels it shares with Q5_K (q5_k.py).

Block of 256 weights, 8 sub-blocks of 32: fp16 d, fp16 dmin, 12 bytes of packed
6-bit (scale, min) pairs, [Q5_K only: qh[32], bit j of qh[l] is the 5th bit of
element l of sub-block j], qs[128]: byte l of 32-byte group g holds element l of
sub-block 2g (low nibble) and of sub-block 2g+1 (high nibble).
Weight = (d * scale_j) * q - dmin * min_j.

Dot products follow ggml's vec_dot_q4_K_q8_K: x is quantized to Q8_K once
(common.py; `widen` adapts it for these kernels), then per block, in exact int32,
    sumi = sum_j scale_j * (q_j . x8_j)    summ = sum_j min_j * (sum of x8_j)
and in float32  y += (x.d * d) * sumi;  ym += (-x.d * dmin) * summ;  y + ym.
"""
import numba
import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .base import QuantType
from .common import F16_TO_F32, QK_K, q8_k_activation, take_next

ROW_CHUNK = 256  # rows per work item of the matvec kernels: long runs per thread keep prefetchers streaming; even, so pairs stay within one

# The kernels index w[r, o + ...] with o = b * <constant type size>: LLVM then
# knows every index is non-negative, so numba's negative-index wraparound
# disappears and the block dot vectorizes. (Per-row or per-block slices would
# also do, but each view costs an atomic refcount update in the hot loop.)


@njit(inline="always")
def _f16(w, r, o):
    return F16_TO_F32[np.int32(w[r, o]) | (np.int32(w[r, o + 1]) << 8)]


@njit(inline="always")
def _u32(w, r, o):
    return (np.uint32(w[r, o]) | (np.uint32(w[r, o + 1]) << np.uint32(8))
            | (np.uint32(w[r, o + 2]) << np.uint32(16)) | (np.uint32(w[r, o + 3]) << np.uint32(24)))


@njit(inline="always")
def _byte(u, k):
    return np.int32((u >> np.uint32(8 * k)) & np.uint32(255))


@njit(inline="always")
def _scales(w, r, o):
    """The 8 6-bit scales then the 8 mins of the block at w[r, o:], as int32.

    Unpacks 4 at a time in 32-bit words like ggml's utmp code: ~1.4x faster
    matvec than unpacking each 6-bit (scale, min) pair separately (same result)."""
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


@njit(inline="always")
def _t(s, x, q):
    # scale * x8 fits int16 (63 * 127): LLVM pre-scales x with vpmullw and sums
    # q * (s * x) with vpmaddwd over the whole block, one horizontal add per block
    return np.int32(np.int16(s * x)) * np.int32(q)


@njit(inline="always")
def _q(w, r, o, j, l, five):
    """Unsigned quant of element l of sub-block j (j and five are constants after inlining)."""
    if five:
        return ((w[r, o + 48 + 32 * (j >> 1) + l] >> (4 * (j & 1))) & 15) | (((w[r, o + 16 + l] >> j) & 1) << 4)
    return (w[r, o + 16 + 32 * (j >> 1) + l] >> (4 * (j & 1))) & 15


@njit(inline="always")
def _x8(xq, t, xo, l):
    """Element l of each of the 8 sub-blocks of x = xq[t, xo:xo+256]."""
    return (xq[t, xo + l], xq[t, xo + 32 + l], xq[t, xo + 64 + l], xq[t, xo + 96 + l],
            xq[t, xo + 128 + l], xq[t, xo + 160 + l], xq[t, xo + 192 + l], xq[t, xo + 224 + l])


@njit(inline="always")
def _terms(w, r, o, l, x, sc, five):
    """sum_j sc_j * q_j[l] * x_j[l] for the block at w[r, o:]."""
    return (_t(sc[0], x[0], _q(w, r, o, 0, l, five)) + _t(sc[1], x[1], _q(w, r, o, 1, l, five))
            + _t(sc[2], x[2], _q(w, r, o, 2, l, five)) + _t(sc[3], x[3], _q(w, r, o, 3, l, five))
            + _t(sc[4], x[4], _q(w, r, o, 4, l, five)) + _t(sc[5], x[5], _q(w, r, o, 5, l, five))
            + _t(sc[6], x[6], _q(w, r, o, 6, l, five)) + _t(sc[7], x[7], _q(w, r, o, 7, l, five)))


@njit(inline="always")
def _sumi(w, r, o, xq, t, xo, sc, five):
    """sum_j sc_j * (q_j . x_j) for the block at w[r, o:] and x = xq[t, xo:xo+256] (int16)."""
    acc = np.int32(0)
    for l in range(32):
        acc = np.int32(acc + _terms(w, r, o, l, _x8(xq, t, xo, l), sc, five))
    return acc


@njit(inline="always")
def _summ(sc, bs32, t, k):
    """sum_j min_j * (sum of x8 over sub-block j), bs32[t, k:k+8] holding those sums."""
    return np.int32(sc[8] * bs32[t, k] + sc[9] * bs32[t, k + 1] + sc[10] * bs32[t, k + 2] + sc[11] * bs32[t, k + 3]
                    + sc[12] * bs32[t, k + 4] + sc[13] * bs32[t, k + 5] + sc[14] * bs32[t, k + 6]
                    + sc[15] * bs32[t, k + 7])


@njit(inline="always")
def _row(w, r, xq, d8, bs32, ts, five, t=0):
    """Token t of xq dotted with row r: the float32 steps of ggml's vec_dot."""
    y = np.float32(0.0)
    ym = np.float32(0.0)
    for b in range(d8.shape[1]):
        o = b * ts
        sc = _scales(w, r, o)
        sumi = _sumi(w, r, o, xq, t, b * QK_K, sc, five)
        y += (d8[t, b] * _f16(w, r, o)) * np.float32(sumi)
        ym += (-d8[t, b] * _f16(w, r, o + 2)) * np.float32(_summ(sc, bs32, t, b * 8))
    return y + ym


@njit(inline="always")
def _row_pair(w, r, xq, d8, bs32, ts, five):
    """_row for rows r and r+1 at once: each x load serves two rows."""
    y0 = np.float32(0.0)
    ym0 = np.float32(0.0)
    y1 = np.float32(0.0)
    ym1 = np.float32(0.0)
    for b in range(d8.shape[1]):
        o = b * ts
        sa = _scales(w, r, o)
        sb = _scales(w, r + 1, o)
        s0 = np.int32(0)
        s1 = np.int32(0)
        for l in range(32):
            x = _x8(xq, 0, b * QK_K, l)
            s0 = np.int32(s0 + _terms(w, r, o, l, x, sa, five))
            s1 = np.int32(s1 + _terms(w, r + 1, o, l, x, sb, five))
        y0 += (d8[0, b] * _f16(w, r, o)) * np.float32(s0)
        ym0 += (-d8[0, b] * _f16(w, r, o + 2)) * np.float32(_summ(sa, bs32, 0, b * 8))
        y1 += (d8[0, b] * _f16(w, r + 1, o)) * np.float32(s1)
        ym1 += (-d8[0, b] * _f16(w, r + 1, o + 2)) * np.float32(_summ(sb, bs32, 0, b * 8))
    return y0 + ym0, y1 + ym1


def make_kernels(five):
    """(matvec, matvec_pairs, matmul, dequantize, matvec_experts) njit kernels for Q4_K (five=False) or Q5_K.

    `five` and the block size are closure constants, compiled in."""
    ts = 176 if five else 144
    qo = 48 if five else 16  # offset of qs in the block

    @njit(cache=True, nogil=True, parallel=True)
    def matvec(out, xq, d8, bs32, w, n_par):  # out f32[n_rows], xq i16[1, n], d8 f32[1, n//256], bs32 i32[1, n//32], w u8[n_rows, row_bytes]; n_par threads
        n_rows = w.shape[0]
        counter = np.zeros(1, np.int64)
        for _ in prange(n_par):  # chunks of rows, taken dynamically (common.take_next)
            c = take_next(counter)
            while c * ROW_CHUNK < n_rows:
                for r in range(c * ROW_CHUNK, min(n_rows, (c + 1) * ROW_CHUNK)):
                    out[r] = _row(w, r, xq, d8, bs32, ts, five)
                c = take_next(counter)

    @njit(cache=True, nogil=True, parallel=True)
    def matvec_pairs(out, xq, d8, bs32, w, n_par):  # same as matvec, two rows per step
        n_rows = w.shape[0]
        counter = np.zeros(1, np.int64)
        for _ in prange(n_par):
            c = take_next(counter)
            while c * ROW_CHUNK < n_rows:
                r1 = min(n_rows, (c + 1) * ROW_CHUNK)
                for r in range(c * ROW_CHUNK, r1, 2):
                    if r + 1 < r1:
                        out[r], out[r + 1] = _row_pair(w, r, xq, d8, bs32, ts, five)
                    else:
                        out[r] = _row(w, r, xq, d8, bs32, ts, five)
                c = take_next(counter)

    @njit(cache=True, nogil=True, parallel=True)
    def matmul(out, xq, d8, bs32, w):  # out f32[n_tok, n_rows], xq i16[n_tok, n], d8 f32[n_tok, n//256], bs32 i32[n_tok, n//32], w u8[n_rows, row_bytes]
        # per token the same float32 operations as matvec: bit-identical results
        n_tok = out.shape[0]
        for r in prange(w.shape[0]):
            y = np.zeros(n_tok, np.float32)
            ym = np.zeros(n_tok, np.float32)
            for b in range(d8.shape[1]):
                o = b * ts
                sc = _scales(w, r, o)
                d = _f16(w, r, o)
                dmin = _f16(w, r, o + 2)
                for t in range(n_tok):
                    sumi = _sumi(w, r, o, xq, t, b * QK_K, sc, five)
                    summ = _summ(sc, bs32, t, b * 8)
                    y[t] += (d8[t, b] * d) * np.float32(sumi)
                    ym[t] += (-d8[t, b] * dmin) * np.float32(summ)
            for t in range(n_tok):
                out[t, r] = y[t] + ym[t]

    @njit(cache=True, nogil=True, parallel=True)
    def dequantize(out, w):  # out f32[n_rows, n_cols], w u8[n_rows, row_bytes]
        for r in prange(out.shape[0]):
            for b in range(out.shape[1] // QK_K):
                o = b * ts
                d = _f16(w, r, o)
                dmin = _f16(w, r, o + 2)
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

    @njit(cache=True, nogil=True, parallel=True)
    def matvec_experts(out, xq, d8, bs32, ws, sel, xrow, n_par):  # out f32[n_mat, n_sel, n_rows], xq i16[n_x, n], d8 f32[n_x, n//256], bs32 i32[n_x, n//32], ws: n_mat x u8[n_expert, n_rows, row_bytes], sel/xrow i64[n_sel]
        # out[m, s] = ws[m][sel[s]] @ x[xrow[s]], every matrix in one parallel region
        n_mat, n_sel, n_rows = out.shape
        n_chunks = (n_rows + ROW_CHUNK - 1) // ROW_CHUNK
        counter = np.zeros(1, np.int64)
        for _ in prange(n_par):
            i = take_next(counter)
            while i < n_mat * n_sel * n_chunks:
                ms, c = i // n_chunks, i % n_chunks
                m, s = ms // n_sel, ms % n_sel
                w = ws[m][sel[s]]
                for r in range(c * ROW_CHUNK, min(n_rows, (c + 1) * ROW_CHUNK)):
                    out[m, s, r] = _row(w, r, xq, d8, bs32, ts, five, xrow[s])
                i = take_next(counter)

    return matvec, matvec_pairs, matmul, dequantize, matvec_experts


def widen(qs, d8, bsums):
    """Q8_K activation (common.q8_k_activation output, [n_tok, ...]) -> what the kernels read:
    (quants as int16, d8, sums over 32). int16 lets LLVM pre-scale x with vpmullw (see _t);
    the 32-sums save the kernels adding pairs of 16-sums in every block of every row."""
    return qs.astype(np.int16), d8, bsums.reshape(*bsums.shape[:-1], -1, 2).sum(axis=-1, dtype=np.int32)


def quantize_activation(x):
    """f32[n_tok, n] -> prepared Q8_K activation, reusable for every Q4_K/Q5_K weight with n columns."""
    return widen(*q8_k_activation(x))


class KQuant45(QuantType):
    """Driver shared by Q4_K and Q5_K; subclasses set `kernels = make_kernels(five)`.

    `prepare` gives x as Q8_K widened to int16 (act_format "q8_k16"), for any
    number of `matmul_prepared_into` calls."""

    act_format = "q8_k16"
    kernels: tuple
    pair_cols = None  # matvec takes rows in pairs above this many columns

    def dequantize_into(self, out, w):
        self.kernels[3](out, w)

    def prepare(self, x):
        return quantize_activation(x)

    def matmul_prepared_into(self, out, act, w):
        self.matmul_prepared(out[0] if out.shape[0] == 1 else out, act, w)

    def matmul_prepared(self, out, act, w):
        """out f32[n_rows] (one token: matvec kernel, no per-row scratch) or f32[n_tok, n_rows]."""
        n_tok = 1 if out.ndim == 1 else out.shape[0]
        n_cols = w.shape[1] // self.type_size * self.block_size
        if out.shape[-1] != w.shape[0] or act[0].size != n_tok * n_cols:
            raise ValueError(f"{self.qtype.name}: activation of {act[0].shape} and output of {out.shape} "
                             f"do not fit weights of {w.shape[0]} x {n_cols}")
        if out.ndim == 1:
            pairs = self.pair_cols is not None and n_cols > self.pair_cols
            self.kernels[1 if pairs else 0](out, *(a.reshape(1, -1) for a in act), w, numba.get_num_threads())
        else:
            self.kernels[2](out, *act, w)

    def matvec_experts_into(self, out, act, stacks, sel, xrow):
        n_cols = act[0].shape[1]
        if (not all(w.ndim == 3 and w.shape[1:] == (out.shape[2], self.row_bytes(n_cols)) and w.flags.c_contiguous
                    for w in stacks) or len(stacks) != out.shape[0]
                or max(sel) >= min(w.shape[0] for w in stacks) or max(xrow) >= act[0].shape[0]):
            raise ValueError(f"{self.qtype.name}: expert stacks do not fit out {out.shape} / activation {act[0].shape}")
        self.kernels[4](out, *act, tuple(stacks), sel, xrow, numba.get_num_threads())

    def _matmul(self, out, qs, d8, bsums, w):
        """Same, from an unprepared Q8_K activation (the convention of the other K-quants)."""
        self.matmul_prepared(out, widen(qs, d8, bsums), w)


class Q4_K(KQuant45):
    qtype = GGMLQuantizationType.Q4_K
    kernels = make_kernels(False)
    # Long rows: x (2 bytes/column) no longer stays in L1; sharing its loads
    # between 2 rows measured 1.3x (14336 cols) to 3x (28672 cols) faster, but
    # 0.9x at <= 7168 cols. Q5_K's pair kernel was slower at every size.
    pair_cols = 8192

    def quantize(self, w):
        from .kquant_quantize import quantize_rows  # kept out of the runtime's import path
        return quantize_rows(self, w)

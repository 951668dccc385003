"""Q3_K, Q4_K, Q5_K and Q6_K quantizers, byte-identical to llama.cpp's (no imatrix).

ggml_quantize_chunk without an importance matrix calls quantize_row_q*_K_ref
(ggml-quants.c) with the scale searches make_q3_quants, make_qkx2_quants and
make_qx_quants. libggml-base is built without FMA, so plain float32 arithmetic
in C's evaluation order (a*b*c is (a*b)*c, ints converted to float32 first)
reproduces its bytes. nearest_int is ggml's magic-number trick (half to even,
garbage rather than an error for |x| > 2^22, as in C); casts to int8/uint8 wrap.
"""
import functools

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from .common import QK_K
from .floats import f16_to_f32, f16_to_f32_keep_nan, f32_bits, f32_from_bits
from .legacy_quantize import F16, F32, fp16_bits, quantize_row as quantize_row_32

Q3_K, Q4_K, Q5_K, Q6_K = int(T.Q3_K), int(T.Q4_K), int(T.Q5_K), int(T.Q6_K)
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS
_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23


@njit(inline="always", error_model="numpy")
def nearest_int(f):
    return np.int32(f32_bits(f + _MAGIC) & np.uint32(0x7FFFFF)) - np.int32(0x400000)


@njit(inline="always", error_model="numpy")
def _clamp(v, lo, hi):
    return max(lo, min(hi, v))


@njit(inline="always", error_model="numpy")
def _put_f16(o, at, f):
    """Store fp16(f) little-endian at o[at:at+2]; return the float32 it decodes to."""
    h = fp16_bits(f)
    o[at] = np.uint8(h & np.uint16(0xFF))
    o[at + 1] = np.uint8(h >> np.uint16(8))
    return f16_to_f32(h)


@njit(inline="always", error_model="numpy")
def _signed_absmax(x, xo, n):
    """(max |x|, the first element reaching it) over x[xo:xo+n]."""
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    for i in range(xo, xo + n):
        a = abs(x[i])
        if a > amax:
            amax = a
            vmax = x[i]
    return amax, vmax


@njit(inline="always", error_model="numpy")
def _qx_l(x, i, nmax, iscale):
    return _clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1)


@njit(inline="always", error_model="numpy")
def _qx_sums3(x, xo, n, nmax, ia, ib, ic):
    """make_qx_quants' (sumlx, suml2) for three trial iscales at once: each sum keeps C's
    order, but six independent add chains instead of two (the search is add-latency bound)."""
    za = np.float32(0.0)
    sxa, sla, sxb, slb, sxc, slc = za, za, za, za, za, za
    for i in range(xo, xo + n):
        w = x[i] * x[i]
        wx = w * x[i]
        la, lb, lc = np.float32(_qx_l(x, i, nmax, ia)), np.float32(_qx_l(x, i, nmax, ib)), np.float32(_qx_l(x, i, nmax, ic))
        sxa += wx * la
        sla += w * la * la
        sxb += wx * lb
        slb += w * lb * lb
        sxc += wx * lc
        slc += w * lc * lc
    return sxa, sla, sxb, slb, sxc, slc


@njit(inline="always", error_model="numpy")
def make_qx_quants(x, xo, L, n, nmax):
    """ggml's make_qx_quants with rmse_type 1 and no weights: L[xo:xo+n] in [0, 2*nmax), returns the scale."""
    amax, vmax = _signed_absmax(x, xo, n)
    if amax < _EPS:
        for i in range(xo, xo + n):
            L[i] = 0
        return np.float32(0.0)
    fn = np.float32(nmax)
    iscale = -fn / vmax
    sumlx, suml2, _, _, _, _ = _qx_sums3(x, xo, n, nmax, iscale, iscale, iscale)
    for i in range(xo, xo + n):
        L[i] = nmax + _qx_l(x, i, nmax, iscale)
    scale = sumlx / suml2 if suml2 != 0 else np.float32(0.0)
    best = scale * sumlx
    for t in range(6):  # trial offsets -9..-1, 1..9 in triples, judged in C's order
        s0 = -9 + 3 * t + (1 if t >= 3 else 0)
        isc = (-(fn + np.float32(0.1) * np.float32(s0)) / vmax, -(fn + np.float32(0.1) * np.float32(s0 + 1)) / vmax,
               -(fn + np.float32(0.1) * np.float32(s0 + 2)) / vmax)
        sums = _qx_sums3(x, xo, n, nmax, isc[0], isc[1], isc[2])
        for k in range(3):
            sumlx, suml2 = sums[2 * k], sums[2 * k + 1]
            if suml2 > 0 and sumlx * sumlx > best * suml2:
                for i in range(xo, xo + n):
                    L[i] = nmax + _qx_l(x, i, nmax, isc[k])
                scale = sumlx / suml2
                best = scale * sumlx
    return scale


@njit(inline="always", error_model="numpy")
def make_q3_quants(x, xo, L, n, nmax):
    """ggml's make_q3_quants with do_rmse: L[xo:xo+n] in [0, 2*nmax), returns the scale."""
    amax, vmax = _signed_absmax(x, xo, n)
    if amax < _EPS:
        for i in range(xo, xo + n):
            L[i] = 0
        return np.float32(0.0)
    iscale = -np.float32(nmax) / vmax
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(xo, xo + n):
        l = _clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1)
        L[i] = l
        w = x[i] * x[i]
        sumlx += w * x[i] * np.float32(l)
        suml2 += w * np.float32(l) * np.float32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(xo, xo + n):
            w = x[i] * x[i]
            fl = np.float32(L[i])
            slx = sumlx - w * x[i] * fl
            if slx > 0:
                sl2 = suml2 - w * fl * fl
                new_l = _clamp(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
                if new_l != L[i]:
                    fn = np.float32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(xo, xo + n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else np.float32(0.0)


@njit(inline="always", error_model="numpy")
def _qkx2_fit(D, sum_w, sum_x, sum_l, sum_l2, sum_xl):
    """make_qkx2_quants' least-squares (scale, min) of one trial; meaningful only if D > 0."""
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
    if this_min > 0:
        return sum_xl / sum_l2, np.float32(0.0)
    return this_scale, this_min


@njit(inline="always", error_model="numpy")
def _qkx2_trials2(x, xo, wts, nmax, mn, ia, ib, La, Lb, sum_w, sum_x):
    """Two trial iscales of make_qkx2_quants at once (quants into La/Lb, each sum in C's order,
    twice the independent add chains): (D, scale, min, error) for each."""
    z = np.float32(0.0)
    sla, sl2a, sxla, slb, sl2b, sxlb = z, z, z, z, z, z
    for i in range(32):
        v = x[xo + i] - mn
        la = _clamp(nearest_int(ia * v), 0, nmax)
        lb = _clamp(nearest_int(ib * v), 0, nmax)
        La[i] = la
        Lb[i] = lb
        wla = wts[i] * np.float32(la)
        wlb = wts[i] * np.float32(lb)
        sla += wla
        sl2a += wla * np.float32(la)
        sxla += wla * x[xo + i]
        slb += wlb
        sl2b += wlb * np.float32(lb)
        sxlb += wlb * x[xo + i]
    Da = sum_w * sl2a - sla * sla
    Db = sum_w * sl2b - slb * slb
    sa, ma = _qkx2_fit(Da, sum_w, sum_x, sla, sl2a, sxla)
    sb, mb = _qkx2_fit(Db, sum_w, sum_x, slb, sl2b, sxlb)
    ea = z
    eb = z
    for i in range(32):
        da = sa * np.float32(La[i]) + ma - x[xo + i]
        db = sb * np.float32(Lb[i]) + mb - x[xo + i]
        ea += wts[i] * (da * da)
        eb += wts[i] * (db * db)
    return Da, sa, ma, ea, Db, sb, mb, eb


@njit(inline="always", error_model="numpy")
def make_qkx2_quants(x, xo, wts, L, Laux, nmax, rmin, rdelta, nstep):
    """ggml's make_qkx2_quants (use_mad false) on 32 values x[xo:] with weights wts[32]:
    L[xo:xo+32] in [0, nmax]; returns (scale, the_min) with x ~ scale * L - the_min.
    Laux is i32[2, 32] scratch."""
    n = 32
    mn = x[xo]
    mx = x[xo]
    sum_w = wts[0]
    sum_x = sum_w * x[xo]
    for i in range(1, n):
        v = x[xo + i]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
        sum_w += wts[i]
        sum_x += wts[i] * v
    if mn > 0:
        mn = np.float32(0.0)
    if mx == mn:
        for i in range(n):
            L[xo + i] = 0
        return np.float32(0.0), -mn
    fn = np.float32(nmax)
    iscale = fn / (mx - mn)
    scale = np.float32(1.0) / iscale
    best_error = np.float32(0.0)
    for i in range(n):
        l = _clamp(nearest_int(iscale * (x[xo + i] - mn)), 0, nmax)
        L[xo + i] = l
        diff = scale * np.float32(l) + mn - x[xo + i]
        best_error += wts[i] * (diff * diff)
    # Trials s and s+1 run together; C's sequential order is kept by judging s first and, when
    # it wins, redoing s+1: a new best moves mn, which trial s+1 depends on.
    s = 0
    while s <= nstep:
        t = min(s + 1, nstep)
        ia = (rmin + rdelta * np.float32(s) + fn) / (mx - mn)
        ib = (rmin + rdelta * np.float32(t) + fn) / (mx - mn)
        Da, sa, ma, ea, Db, sb, mb, eb = _qkx2_trials2(x, xo, wts, nmax, mn, ia, ib, Laux[0], Laux[1], sum_w, sum_x)
        if Da > 0 and ea < best_error:
            for i in range(n):
                L[xo + i] = Laux[0, i]
            best_error, scale, mn = ea, sa, ma
            s += 1
            continue
        if t > s and Db > 0 and eb < best_error:
            for i in range(n):
                L[xo + i] = Laux[1, i]
            best_error, scale, mn = eb, sb, mb
        s += 2
    return scale, -mn


@njit(inline="always", error_model="numpy")
def _block_q3_k(x, xo, o, ob, L, scales, qsc):  # x[xo:xo+256] -> o[ob:ob+110]: hmask[32] qs[64] scales[12] d
    max_scale = np.float32(0.0)
    amax = np.float32(0.0)
    for j in range(16):
        s = make_q3_quants(x, xo + 16 * j, L, 16, 4)
        scales[j] = s
        if abs(s) > amax:
            amax = abs(s)
            max_scale = s
    for k in range(12):
        o[ob + 96 + k] = 0
    dd = np.float32(0.0)
    if max_scale != 0:  # C's `if (max_scale)`: NaN counts as true
        iscale = np.float32(-32.0) / max_scale
        for j in range(16):
            l = _clamp(np.int32(np.int8(nearest_int(iscale * scales[j]) & 0xFF)), -32, 31) + 32
            qsc[j] = l - 32
            if j < 8:
                o[ob + 96 + j] = np.uint8(l & 0xF)
            else:
                o[ob + 96 + j - 8] |= np.uint8((l & 0xF) << 4)
            o[ob + 104 + j % 4] |= np.uint8((l >> 4) << (2 * (j // 4)))
        dd = _put_f16(o, ob + 108, np.float32(1.0) / iscale)
    else:
        _put_f16(o, ob + 108, np.float32(0.0))
    for j in range(16):
        d = dd * np.float32(qsc[j])
        if d == 0:
            continue
        for i in range(xo + 16 * j, xo + 16 * j + 16):
            L[i] = _clamp(nearest_int(x[i] / d), -4, 3) + 4
    for k in range(32):
        o[ob + k] = 0
    for j in range(QK_K):  # high bit of element j -> bit j // 32 of hmask[j % 32]
        if L[xo + j] > 3:
            o[ob + j % 32] |= np.uint8(1 << (j // 32))
            L[xo + j] -= 4
    for h in range(2):
        for l in range(32):
            e = xo + 128 * h + l
            o[ob + 32 + 32 * h + l] = np.uint8(L[e] | (L[e + 32] << 2) | (L[e + 64] << 4) | (L[e + 96] << 6))


@njit(inline="always", error_model="numpy")
def _block_q45_k(x, xo, o, ob, L, Laux, wts, scales, mins, qsc, five):
    # x[xo:xo+256] -> o[ob:ob+144|176]: d dmin scales[12] [qh[32]] qs[128]
    nmax = 31 if five else 15
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
    for j in range(8):
        s = xo + 32 * j
        sum_x2 = np.float32(0.0)
        for l in range(32):
            sum_x2 += x[s + l] * x[s + l]
        av_x = np.float32(np.sqrt(sum_x2 / np.float32(32.0)))  # numba types np.sqrt(f32) as f64; sqrtf rounds once
        for l in range(32):
            wts[l] = av_x + abs(x[s + l])
        if five:
            sc, mn = make_qkx2_quants(x, s, wts, L, Laux, 31, np.float32(-0.5), np.float32(0.1), 15)
        else:
            sc, mn = make_qkx2_quants(x, s, wts, L, Laux, 15, np.float32(-1.0), np.float32(0.1), 20)
        scales[j] = sc
        mins[j] = mn
        if sc > max_scale:
            max_scale = sc
        if mn > max_min:
            max_min = mn
    inv_scale = np.float32(63.0) / max_scale if max_scale > 0 else np.float32(0.0)
    inv_min = np.float32(63.0) / max_min if max_min > 0 else np.float32(0.0)
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # (uint8_t) cast, then MIN(63, .)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        qsc[j] = ls
        qsc[8 + j] = lm
        if j < 4:
            o[ob + 4 + j] = np.uint8(ls)
            o[ob + 8 + j] = np.uint8(lm)
        else:
            o[ob + 8 + j] = np.uint8((ls & 0xF) | ((lm & 0xF) << 4))
            o[ob + j] |= np.uint8((ls >> 4) << 6)
            o[ob + 4 + j] |= np.uint8((lm >> 4) << 6)
    dd = _put_f16(o, ob, max_scale / np.float32(63.0))
    dmin = _put_f16(o, ob + 2, max_min / np.float32(63.0))
    for j in range(8):
        d = dd * np.float32(qsc[j])
        if d == 0:
            continue
        dm = dmin * np.float32(qsc[8 + j])
        for i in range(xo + 32 * j, xo + 32 * j + 32):
            L[i] = _clamp(nearest_int((x[i] + dm) / d), 0, nmax)
    qo = ob + (48 if five else 16)
    if five:
        for k in range(32):
            o[ob + 16 + k] = 0
    for g in range(4):  # 64 elements: sub-block 2g in low nibbles, 2g+1 in high nibbles
        for l in range(32):
            a = L[xo + 64 * g + l]
            b = L[xo + 64 * g + 32 + l]
            if five:
                if a > 15:
                    a -= 16
                    o[ob + 16 + l] |= np.uint8(1 << (2 * g))
                if b > 15:
                    b -= 16
                    o[ob + 16 + l] |= np.uint8(2 << (2 * g))
            o[qo + 32 * g + l] = np.uint8(a | (b << 4))


@njit(inline="always", error_model="numpy")
def _block_q6_k(x, xo, o, ob, L, scales, qsc):  # x[xo:xo+256] -> o[ob:ob+210]: ql[128] qh[64] scales i8[16] d
    max_scale = np.float32(0.0)
    max_abs = np.float32(0.0)
    for j in range(16):
        s = make_qx_quants(x, xo + 16 * j, L, 16, 32)
        scales[j] = s
        if abs(s) > max_abs:
            max_abs = abs(s)
            max_scale = s
    if max_abs < _EPS:
        for k in range(210):
            o[ob + k] = 0
        return
    iscale = np.float32(-128.0) / max_scale
    dd = _put_f16(o, ob + 208, np.float32(1.0) / iscale)
    for j in range(16):
        v = np.int8(min(127, nearest_int(iscale * scales[j])) & 0xFF)  # stored as int8_t
        qsc[j] = v
        o[ob + 192 + j] = np.uint8(v & 0xFF)
    for j in range(16):
        d = dd * np.float32(qsc[j])
        if d == 0:
            continue
        for i in range(xo + 16 * j, xo + 16 * j + 16):
            L[i] = _clamp(nearest_int(x[i] / d), -32, 31) + 32
    for h in range(2):
        for l in range(32):
            e = xo + 128 * h + l
            q1, q2, q3, q4 = L[e], L[e + 32], L[e + 64], L[e + 96]
            o[ob + 64 * h + l] = np.uint8((q1 & 0xF) | ((q3 & 0xF) << 4))
            o[ob + 64 * h + 32 + l] = np.uint8((q2 & 0xF) | ((q4 & 0xF) << 4))
            o[ob + 128 + 32 * h + l] = np.uint8((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6))


@njit(inline="always", error_model="numpy")
def _quantize_row(x, o, kind, ts):  # x f32[n] -> o u8[n // 256 * ts] in `kind` (Q3_K..Q6_K)
    L = np.empty(x.size, np.int32)  # one row's quants (C keeps one block's)
    Laux = np.empty((2, 32), np.int32)
    wts = np.empty(32, np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(8, np.float32)
    qsc = np.empty(16, np.int32)
    for b in range(x.size // QK_K):
        if kind == Q3_K:
            _block_q3_k(x, b * QK_K, o, b * ts, L, scales, qsc)
        elif kind == Q4_K or kind == Q5_K:
            _block_q45_k(x, b * QK_K, o, b * ts, L, Laux, wts, scales, mins, qsc, kind == Q5_K)
        else:
            _block_q6_k(x, b * QK_K, o, b * ts, L, scales, qsc)


@njit(inline="always")
def _to_f32(s, src_kind, x):  # s u8[n * 4|2] in src_kind (F32, F16 or BF16) -> x f32[n]
    if src_kind == F32:
        x[:] = s.view(np.float32)
    elif src_kind == F16:
        h = s.view(np.uint16)
        for j in range(x.size):
            x[j] = f16_to_f32_keep_nan(h[j])
    else:
        h = s.view(np.uint16)
        for j in range(x.size):
            x[j] = f32_from_bits(np.uint32(h[j]) << np.uint32(16))


@functools.cache
def row_kernel(kind: int):
    """The parallel row loop for output type `kind`, from F32/F16/BF16 rows in one pass (no f32
    copy of the tensor). A closure over the int: numba freezes it, so the type branches fold
    away, and caches one kernel per type (keyed by the closure's value)."""
    @njit(cache=True, nogil=True, parallel=True, error_model="numpy")
    def quantize_into(out, src, src_kind, ts):  # out u8[n_rows, row_bytes], src u8[n_rows, n_cols * 4|2]; ts bytes/block
        n_cols = src.shape[1] // (4 if src_kind == F32 else 2)
        for r in prange(src.shape[0]):
            x = np.empty(n_cols, np.float32)
            _to_f32(src[r], src_kind, x)
            if kind == Q3_K or kind == Q4_K or kind == Q5_K or kind == Q6_K:
                _quantize_row(x, out[r], kind, ts)
            else:
                quantize_row_32(x, out[r], kind, ts)
    return quantize_into


def quantize_rows(qt, w: np.ndarray) -> np.ndarray:
    """w f32[n_rows, n_cols] -> u8[n_rows, row_bytes] in qt's format (any type row_kernel writes)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % qt.block_size:
        raise ValueError(f"{qt.qtype.name}: need f32[n_rows, n_cols] with n_cols % {qt.block_size} == 0, got {w.shape}")
    out = np.empty((w.shape[0], qt.row_bytes(w.shape[1])), np.uint8)
    row_kernel(int(qt.qtype))(out, w.view(np.uint8), F32, qt.type_size)
    return out

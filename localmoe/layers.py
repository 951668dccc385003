"""Norms, RoPE and attention, with llama.cpp's (ggml CPU) rounding where it matters."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from localmoe.quant.floats import f16_to_f32

F32 = np.float32


def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    """x f32[..., n] -> f32[..., n] (times w f32[n] when given), rounded like
    ggml_compute_forward_rms_norm_f32 and the weight's ggml_mul: float32 squares summed in
    float64 in order, the mean cast to float32, eps added and 1/sqrt taken in float32."""
    x = np.ascontiguousarray(x, dtype=F32)
    out = np.empty_like(x)
    n = x.shape[-1]
    has_w = w is not None
    _rms_rows(out.reshape(-1, n), x.reshape(-1, n), np.ascontiguousarray(w, dtype=F32) if has_w else x[..., :0].reshape(-1),
              F32(eps), has_w)
    return out


@njit(cache=True, nogil=True)
def _rms_rows(out, x, w, eps, has_w):  # out, x f32[n_rows, n]; w f32[n] (read when has_w)
    n = x.shape[1]
    for r in range(x.shape[0]):
        acc = 0.0  # float64, as ggml_float
        for i in range(n):
            v = x[r, i]
            acc += np.float64(v * v)
        scale = np.float32(1.0) / np.sqrt(np.float32(acc / n) + eps)
        for i in range(n):
            y = x[r, i] * scale
            out[r, i] = y * w[i] if has_w else y


def silu(x: np.ndarray) -> np.ndarray:
    """x / (1 + exp(-x)) as ggml_vec_silu_f32 (and swiglu) compute it on AVX-512: ggml_v_expf on
    16-wide chunks, libm expf on the tail. A 1-ulp difference from np.exp here is enough to flip
    the rounding of the next Q8_0/Q8_K activation quantization now and then."""
    return _rowwise(_silu_rows, x)


def _rowwise(kernel, x: np.ndarray) -> np.ndarray:
    """kernel(out, x) on f32[n_rows, n] views of x and a new array of its shape (n = last axis)."""
    x = np.ascontiguousarray(x, dtype=F32)
    out = np.empty_like(x)
    kernel(out.reshape(-1, x.shape[-1]), x.reshape(-1, x.shape[-1]))
    return out


@njit(cache=True, nogil=True)
def _silu_rows(out, x):  # out, x f32[n_rows, n]
    n = x.shape[1]
    n_vec = n - n % 16
    for r in range(x.shape[0]):
        for i in range(n):
            v = x[r, i]
            e = _v_expf(-v) if i < n_vec else np.float32(math.exp(-v))
            out[r, i] = v / (np.float32(1.0) + e)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + expf(-x)) with libm's expf, as ggml_vec_sigmoid_f32 (numpy's float32 exp differs in the last bit)."""
    return _rowwise(_sigmoid_rows, x)


@njit(cache=True, nogil=True)
def _sigmoid_rows(out, x):  # out, x f32[n_rows, n]
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            out[r, i] = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-x[r, i])))


def softmax(x: np.ndarray) -> np.ndarray:
    """Row softmax over the last axis as ggml_soft_max computes it (ggml_vec_soft_max_f32)."""
    return _rowwise(_softmax_rows, x)


@njit(cache=True, nogil=True)
def _softmax_rows(out, x):  # out, x f32[n_rows, n]
    """exp(x - max): ggml_v_expf on 16-wide chunks, each chunk summed in float32 (_reduce16) then
    added in float64; the tail through libm expf, added in float64; then scaled by float32(1 / sum)."""
    n = x.shape[1]
    n_vec = n - n % 16
    lanes = np.empty(16, np.float32)
    for r in range(x.shape[0]):
        m = np.float32(-np.inf)
        for i in range(n):
            m = max(m, x[r, i])
        total = 0.0
        for i0 in range(0, n_vec, 16):
            for l in range(16):
                lanes[l] = _v_expf(x[r, i0 + l] - m)
                out[r, i0 + l] = lanes[l]
            total += _reduce16(lanes)
        for i in range(n_vec, n):
            out[r, i] = np.float32(math.exp(x[r, i] - m))
            total += out[r, i]
        inv = np.float32(1.0 / total)
        for i in range(n):
            out[r, i] *= inv


@dataclass(frozen=True)
class Rope:
    """ggml_rope_ext parameters. neox: rotate (i, i + n_rot/2) pairs, else (2i, 2i+1)."""

    n_rot: int
    neox: bool
    freq_base: float = 10000.0
    freq_scale: float = 1.0
    ext_factor: float = 0.0    # YaRN mix; 0 = plain (linear-scaled) RoPE
    attn_factor: float = 1.0   # magnitude scale of cos/sin
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_ctx_orig: int = 0

    def tables(self, n_pos: int, freq_factors: np.ndarray | None = None):
        """(cos, sin) f32[n_pos, n_rot/2], bit-identical to ggml_rope_cache_init's."""
        half = self.n_rot // 2
        ff = np.ones(half, F32) if freq_factors is None else np.ascontiguousarray(freq_factors, F32)
        lo, hi = _corr_dims(self.n_rot, self.n_ctx_orig, F32(self.freq_base), F32(self.beta_fast),
                            F32(self.beta_slow)) if self.ext_factor != 0.0 else (F32(0), F32(0))
        cos, sin = np.empty((n_pos, half), F32), np.empty((n_pos, half), F32)
        _rope_cache(cos, sin, ff, F32(self.freq_base), F32(self.freq_scale), F32(self.ext_factor),
                    F32(self.attn_factor), F32(lo), F32(hi))  # numba hands lo, hi back as float64
        return cos, sin


@njit(cache=True, nogil=True)
def _fma(a, b, c):  # float32 fused multiply-add: the product is exact in float64, one rounding (rare double-rounding aside)
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


@njit(cache=True, nogil=True)
def _corr_dims(n_dims, n_ctx_orig, base, beta_fast, beta_slow):  # -> (low, high) f32, ggml_rope_yarn_corr_dims
    two_pi = np.float32(2) * np.float32(math.pi)
    den = np.float32(2) * math.log(base)
    lo = math.floor(np.float32(n_dims) * math.log(np.float32(n_ctx_orig) / (beta_fast * two_pi)) / den)
    hi = math.ceil(np.float32(n_dims) * math.log(np.float32(n_ctx_orig) / (beta_slow * two_pi)) / den)
    return np.float32(max(np.float32(0), lo)), np.float32(min(np.float32(n_dims - 1), hi))


@njit(cache=True, nogil=True)
def _rope_cache(cos, sin, ff, base, freq_scale, ext_factor, attn_factor, lo, hi):  # cos/sin f32[n_pos, half], ff f32[half]
    """ggml_rope_cache_init + rope_yarn in float32 with libm cosf/sinf/powf/logf (numba's
    float32 math calls them) and the FMAs gcc contracts ggml's expressions into."""
    n_pos, half = cos.shape
    theta_scale = math.pow(base, np.float32(-2.0) / np.float32(2 * half))
    mscale = attn_factor
    if ext_factor != 0:
        mscale = mscale * _fma(np.float32(0.1), math.log(np.float32(1) / freq_scale), np.float32(1))
    for p in range(n_pos):
        theta = np.float32(p)
        for i in range(half):
            t_extrap = theta / ff[i]
            t = freq_scale * t_extrap
            if ext_factor != 0:
                y = (np.float32(i) - lo) / max(np.float32(0.001), hi - lo)
                mix = (np.float32(1) - min(np.float32(1), max(np.float32(0), y))) * ext_factor
                t = _fma(t, np.float32(1) - mix, t_extrap * mix)
            cos[p, i] = math.cos(t) * mscale
            sin[p, i] = math.sin(t) * mscale
            theta = theta * theta_scale


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> None:
    """In place. x f32[n_tok, n_heads, head_dim]; cos/sin f32[n_tok, n_rot/2] rows for x's positions.
    Rounded like ggml's compiled rotate_pairs: x0*c - x1*s as fma(x0, c, -(x1*s))."""
    half = cos.shape[1]
    if neox:
        a, b = x[..., :half], x[..., half:2 * half]
    else:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
    c, s = cos[:, None, :].astype(np.float64), sin[:, None, :].astype(np.float64)
    a0, b0 = a.astype(np.float64), b.astype(np.float64)
    a[...] = a0 * c - (b0 * s).astype(F32)
    b[...] = a0 * s + (b0 * c).astype(F32)


def round_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(F32)


@njit(cache=True, nogil=True)
def matvec_f32_vec_dot(out, x, w):  # out f32[n_rows], x f32[n], w f32[n_rows, n]
    """W x in ggml_vec_dot_f32's (AVX-512) order, which llama.cpp uses for F32 weights when one
    token is multiplied (batches go through llamafile sgemm): four 16-lane fma accumulators
    over 64-wide steps, summed (0+2)+(1+3), then _reduce16; leftovers added in float32."""
    n = x.size
    n64 = n & ~63
    acc = np.empty((4, 16), np.float32)
    for r in range(w.shape[0]):
        acc[:] = 0
        for i in range(0, n64, 64):
            for j in range(4):
                for l in range(16):
                    acc[j, l] = _fma(x[i + 16 * j + l], w[r, i + 16 * j + l], acc[j, l])
        _fold4(acc)
        s = _reduce16(acc[0])
        for i in range(n64, n):
            s += x[i] * w[r, i]
        out[r] = s


@njit(cache=True, nogil=True)
def matmul_f32_sgemm(out, x, w):  # out f32[n_tok, n_rows], x f32[n_tok, n], w f32[n_rows, n]; n % 16 == 0
    """W x for a batch of F32 tokens in llamafile sgemm's (tinyBLAS, AVX-512) order, which llama.cpp
    uses for F32 weights when n_tok >= 2, n % 16 == 0 and n_rows % 4 == 0: one 16-lane fma
    accumulator per output over the 16-wide steps, then _reduce16."""
    lanes = np.empty(16, np.float32)
    for t in range(x.shape[0]):
        for r in range(w.shape[0]):
            lanes[:] = 0
            for i in range(0, x.shape[1], 16):
                for l in range(16):
                    lanes[l] = _fma(w[r, i + l], x[t, i + l], lanes[l])
            out[t, r] = _reduce16(lanes)


# ggml_v_expf (AVX-512 build) constants
_EXP_SHIFT, _LOG2E = F32(float.fromhex("0x1.8p23")), F32(float.fromhex("0x1.715476p+0"))
_LN2_HI, _LN2_LO = F32(float.fromhex("0x1.62e4p-1")), F32(float.fromhex("0x1.7f7d1cp-20"))
_EXP_C = tuple(F32(float.fromhex(h)) for h in ("0x1.ffffecp-1", "0x1.fffdb6p-2", "0x1.555e66p-3",
                                               "0x1.573e2ep-5", "0x1.0e4020p-7"))


@njit(inline="always")
def _v_expf(x):  # f32 -> f32, ggml_v_expf's polynomial (soft_max uses it, not libm expf)
    z = _fma(x, _LOG2E, _EXP_SHIFT)
    n = z - _EXP_SHIFT
    if not abs(n) <= np.float32(192):
        return np.float32(0) if n <= 0 else np.float32(np.inf)
    b = _fma(-n, _LN2_LO, _fma(-n, _LN2_HI, x))
    u = b * b
    c1, c2, c3, c4, c5 = _EXP_C
    j = _fma(_fma(_fma(c5, b, c4), u, _fma(c3, b, c2)), u, _fma(c1, b, np.float32(1)))
    return np.float32(math.ldexp(np.float64(j), int(n)))


@njit(inline="always")
def _reduce16(a):  # f32[16] -> f32 in gcc's _mm512_reduce_add_ps order (halves, then quarters, ...)
    t0 = (a[12] + a[4]) + (a[8] + a[0])
    t1 = (a[13] + a[5]) + (a[9] + a[1])
    t2 = (a[14] + a[6]) + (a[10] + a[2])
    t3 = (a[15] + a[7]) + (a[11] + a[3])
    return (t0 + t2) + (t1 + t3)


@njit(inline="always")
def _fold4(acc):  # acc f32[4, 16] -> acc[0] = (acc0 + acc2) + (acc1 + acc3), ggml's GGML_F32x16_REDUCE
    for l in range(16):
        acc[0, l] = (acc[0, l] + acc[2, l]) + (acc[1, l] + acc[3, l])


@njit(inline="always")
def _dot_f16(a, b, acc, one_tok):  # a f32[n] holding fp16 values, b u16[n] fp16 bits; acc f32[4, 16] scratch
    """a·b as llama.cpp's f16 mul_mat computes it. b is read from the fp16 cache as it is
    (vcvtph2ps per element), so no f32 copy of the cache is made. Products of fp16 values are exact in f32,
    so fma == multiply-add and only the summation order matters: batches (n % 16 == 0) go
    through llamafile sgemm, 16 lanes then _reduce16; one token (sgemm needs two) through
    ggml_vec_dot_f16: four 16-lane accumulators over 64-wide steps, leftovers in float64."""
    n = a.size
    acc[:] = 0
    if not one_tok and n % 16 == 0:
        for d in range(n):
            acc[0, d & 15] += a[d] * f16_to_f32(b[d])
        return _reduce16(acc[0])
    n64 = n & ~63
    for d in range(n64):
        acc[(d >> 4) & 3, d & 15] += a[d] * f16_to_f32(b[d])
    _fold4(acc)
    s = np.float64(_reduce16(acc[0]))
    for d in range(n64, n):
        s += np.float64(a[d] * f16_to_f32(b[d]))
    return np.float32(s)


@njit(inline="always")
def _probs_row(p, q, k, pos0, scale, one_tok, th):
    """Causal softmax(scale * K·q) of (token, head) th like ggml_soft_max_ext: max-shifted
    ggml_v_expf over 16-wide chunks, each chunk reduced in float32 then summed in float64;
    masked (future) positions get 0. one_tok: the whole batch is one token (a row tile of a
    larger batch keeps the batch's summation order)."""
    n_tok, n_head, hd = q.shape
    g = n_head // k.shape[1]
    t, h = th // n_head, th % n_head
    n = pos0 + t + 1
    row = p[t, h]
    acc = np.empty((4, 16), np.float32)
    m = np.float32(-np.inf)
    for j in range(n):
        row[j] = _dot_f16(q[t, h], k[j, h // g], acc, one_tok) * scale
        m = max(m, row[j])
    total = 0.0
    lanes = acc[0]
    for j0 in range(0, n, 16):
        for l in range(16):
            j = j0 + l
            lanes[l] = 0
            if j < n:
                row[j] = _v_expf(row[j] - m)
                lanes[l] = row[j]
        total += _reduce16(lanes)
    inv = np.float32(1.0 / total)
    for j in range(n):
        row[j] *= inv
    for j in range(n, row.size):
        row[j] = 0


@njit(inline="always")
def _values_row(out, p, v, one_tok, th):
    """out = p · V summed over positions in _dot_f16's orders (llama.cpp pads n_kv to a multiple
    of 256: no leftovers; the positions past ours hold exact zeros)."""
    n_tok, n_head, n_kv = p.shape
    g = n_head // v.shape[1]
    t, h = th // n_head, th % n_head
    o = out[t, h]
    acc = np.zeros((o.size, 4, 16), np.float32)
    quad = 3 if one_tok else 0  # ggml_vec_dot_f16's four accumulators, or sgemm's one
    for j in range(n_kv):
        w = p[t, h, j]
        if w != 0:  # masked positions add exact zeros
            vj = v[j, h // g]
            for d in range(o.size):
                acc[d, (j >> 4) & quad, j & 15] += w * f16_to_f32(vj[d])
    for d in range(o.size):
        _fold4(acc[d])
        o[d] = _reduce16(acc[d, 0])


# Parallel over (token, head), and the same loops on one thread for small work
# (a decode step at short context), where the fork/join would cost more.
@njit(cache=True, nogil=True, parallel=True)
def attn_probs(p, q, k, pos0, scale, one_tok):  # p f32[n_tok, n_head, n_kv], q f32[n_tok, n_head, hd], k u16[>= n_kv, n_head_kv, hd] (fp16 bits)
    for th in prange(q.shape[0] * q.shape[1]):
        _probs_row(p, q, k, pos0, scale, one_tok, th)


@njit(cache=True, nogil=True)
def attn_probs_serial(p, q, k, pos0, scale, one_tok):  # as attn_probs
    for th in range(q.shape[0] * q.shape[1]):
        _probs_row(p, q, k, pos0, scale, one_tok, th)


@njit(cache=True, nogil=True, parallel=True)
def attn_values(out, p, v, one_tok):  # out f32[n_tok, n_head, hd_v], p f32[n_tok, n_head, n_kv], v u16[>= n_kv, n_head_kv, hd_v] (fp16 bits)
    for th in prange(p.shape[0] * p.shape[1]):
        _values_row(out, p, v, one_tok, th)


@njit(cache=True, nogil=True)
def attn_values_serial(out, p, v, one_tok):  # as attn_values
    for th in range(p.shape[0] * p.shape[1]):
        _values_row(out, p, v, one_tok, th)


SERIAL_ATTN_MACS = 1 << 17  # below this many multiply-adds (n_tok * n_head * n_kv * hd) attention runs on one thread
ATTN_TILE = 1 << 22  # attention probabilities held at once (elements): query rows go through in tiles of this


def attn_tile_rows(n_head: int, n_ctx: int, n_ub: int) -> int:
    """Query rows per attention tile: as many as keep [rows, n_head, n_ctx] within ATTN_TILE
    (rows are independent, so tiling changes no arithmetic), at least one, at most the batch."""
    return max(1, min(n_ub, ATTN_TILE // max(1, n_head * n_ctx)))


@dataclass(frozen=True)
class RunBuffers:
    """Scratch that every forward pass reuses, allocated once per Model from its config: rows
    for micro-batches of up to n_ub tokens (decode uses the first). Flat buffers hold each call's
    arrays as C-contiguous prefixes. The memory planner counts `nbytes` of the same shapes."""

    q: np.ndarray          # f32[n_ub, n_head * hd_k]: projections, before RoPE
    k: np.ndarray          # f32[n_ub, n_head_kv * hd_k]
    v: np.ndarray          # f32[n_ub, n_head_kv * hd_v]
    router: np.ndarray     # f32[n_ub, n_expert]: router logits
    probs: np.ndarray      # f32[n_rows * n_head * n_ctx]: attention probabilities [rows, n_head, n_kv] of one
                           #   tile of query rows, n_rows = attn_tile_rows(n_head, n_ctx, n_ub)
    probs_f16: np.ndarray  # f16[n_rows * n_head * n_ctx]: their fp16 rounding
    attn_out: np.ndarray   # f32[n_ub * n_head * hd_v]

    @staticmethod
    def shapes(args, n_ctx: int, n_ub: int) -> dict:
        """Field -> (shape, dtype) from the model's ModelArgs."""
        kv_k, kv_v = args.n_head_kv * args.head_dim_k, args.n_head_kv * args.head_dim_v
        n_p = attn_tile_rows(args.n_head, n_ctx, n_ub) * args.n_head * n_ctx
        return {"q": ((n_ub, args.n_head * args.head_dim_k), F32), "k": ((n_ub, kv_k), F32),
                "v": ((n_ub, kv_v), F32), "router": ((n_ub, args.n_expert), F32),
                "probs": ((n_p,), F32), "probs_f16": ((n_p,), np.float16),
                "attn_out": ((n_ub * args.n_head * args.head_dim_v,), F32)}

    @classmethod
    def allocate(cls, args, n_ctx: int, n_ub: int) -> "RunBuffers":
        return cls(**{n: np.empty(s, dt) for n, (s, dt) in cls.shapes(args, n_ctx, n_ub).items()})

    @classmethod
    def nbytes(cls, args, n_ctx: int, n_ub: int) -> int:
        return sum(math.prod(s) * np.dtype(dt).itemsize for s, dt in cls.shapes(args, n_ctx, n_ub).values())


def _view(flat: np.ndarray | None, shape, dtype=F32) -> np.ndarray:
    """[shape] over the first elements of a flat run buffer, or a new array without one."""
    return np.empty(shape, dtype) if flat is None else flat[:math.prod(shape)].reshape(shape)


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int, scale: float,
              buf: RunBuffers | None = None) -> np.ndarray:
    """Causal GQA attention of n_tok queries at positions pos0.. over the cache.

    q f32[n_tok, n_head, hd]; k_cache/v_cache f16[>= pos0+n_tok, n_head_kv, hd]
    -> f32[n_tok, n_head * hd_v] (a view of buf.attn_out when buf is given). Like ggml's
    non-flash CPU path, q is rounded to fp16 for K·q and the softmax probabilities to
    fp16 for the V product.
    """
    n_tok, n_head, _ = q.shape
    n_kv = pos0 + n_tok
    pf, p16f, of = (None,) * 3 if buf is None else (buf.probs, buf.probs_f16, buf.attn_out)
    k = k_cache[:n_kv].view(np.uint16)                       # u16[n_kv, n_head_kv, hd_k]: the fp16 bits, no copy
    v = v_cache[:n_kv].view(np.uint16)                       # u16[n_kv, n_head_kv, hd_v]
    q16 = round_f16(q)
    out = _view(of, (n_tok, n_head, v_cache.shape[2]))       # f32[n_tok, n_head, hd_v]
    rows = attn_tile_rows(n_head, k_cache.shape[0], n_tok)   # the tile RunBuffers was sized for
    for t0 in range(0, n_tok, rows):
        t1 = min(n_tok, t0 + rows)
        nk = pos0 + t1                                       # the tile's last row sees positions 0..nk-1
        serial = (t1 - t0) * n_head * nk * q.shape[2] < SERIAL_ATTN_MACS
        p = _view(pf, (t1 - t0, n_head, nk))                 # f32[rows, n_head, nk]
        (attn_probs_serial if serial else attn_probs)(p, q16[t0:t1], k, pos0 + t0, F32(scale), n_tok == 1)
        p16 = _view(p16f, p.shape, np.float16)
        np.copyto(p16, p)
        np.copyto(p, p16)                                    # p rounded to fp16, in place
        (attn_values_serial if serial else attn_values)(out[t0:t1], p, v, n_tok == 1)
    return out.reshape(n_tok, -1)

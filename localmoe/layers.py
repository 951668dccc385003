"""Norms, RoPE and attention, with llama.cpp's (ggml CPU) rounding where it matters."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

F32 = np.float32


def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    """x f32[..., n] -> f32[..., n]; the sum of squares in float64 like ggml."""
    ms = np.einsum("...i,...i->...", x, x, dtype=np.float64) / x.shape[-1]
    scale = (F32(1.0) / np.sqrt((ms + eps).astype(F32))).astype(F32)
    y = x * scale[..., None]
    return y if w is None else y * w


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflow for x << 0 correctly gives -0
        return x / (F32(1.0) + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return F32(1.0) / (F32(1.0) + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    """Row softmax over the last axis, sum in float64 (ggml_soft_max)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e * (1.0 / e.sum(axis=-1, dtype=np.float64, keepdims=True)).astype(F32)


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
        """(cos, sin) f32[n_pos, n_rot/2], computed the way ggml_rope_cache_init does."""
        half = self.n_rot // 2
        theta_scale = F32(self.freq_base) ** F32(-2.0 / self.n_rot)
        # ggml multiplies theta up one pair at a time in float32; keep that rounding
        theta = np.empty((n_pos, half), F32)
        theta[:, 0] = np.arange(n_pos, dtype=F32)
        for i in range(1, half):
            theta[:, i] = theta[:, i - 1] * theta_scale
        if freq_factors is not None:
            theta = theta / freq_factors.astype(F32)
        interp = F32(self.freq_scale) * theta
        mscale = F32(self.attn_factor)
        if self.ext_factor != 0.0:
            lo, hi = self._corr_dims()
            y = (np.arange(half, dtype=F32) - F32(lo)) / F32(max(0.001, hi - lo))
            ramp = (F32(1) - np.clip(y, 0, 1)) * F32(self.ext_factor)
            theta = interp * (F32(1) - ramp) + theta * ramp
            mscale = F32(mscale * F32(1.0 + 0.1 * math.log(1.0 / self.freq_scale)))
        else:
            theta = interp
        t64 = theta.astype(np.float64)
        return (np.cos(t64).astype(F32) * mscale, np.sin(t64).astype(F32) * mscale)

    def _corr_dims(self) -> tuple[float, float]:
        def dim(n_rot_beta):
            return self.n_rot * math.log(self.n_ctx_orig / (n_rot_beta * 2 * math.pi)) / (2 * math.log(self.freq_base))
        return max(0.0, math.floor(dim(self.beta_fast))), min(self.n_rot - 1.0, math.ceil(dim(self.beta_slow)))


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> None:
    """In place. x f32[n_tok, n_heads, head_dim]; cos/sin f32[n_tok, n_rot/2] rows for x's positions."""
    half = cos.shape[1]
    if neox:
        a, b = x[..., :half], x[..., half:2 * half]
    else:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
    c, s = cos[:, None, :], sin[:, None, :]
    a0 = a.copy()
    a[...] = a0 * c - b * s
    b[...] = a0 * s + b * c


def round_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(F32)


@njit(cache=True, nogil=True, parallel=True)
def attn_probs(p, q, k, pos0, scale):  # p f32[n_tok, n_head, n_kv], q f32[n_tok, n_head, hd], k f32[n_kv, n_head_kv, hd]
    """Causal softmax(scale * K·q) per (token, head) like ggml_soft_max_ext: max-shifted
    exp, sum in float64; masked (future) positions get 0."""
    n_tok, n_head, hd = q.shape
    g = n_head // k.shape[1]
    for th in prange(n_tok * n_head):
        t, h = th // n_head, th % n_head
        n = pos0 + t + 1
        row = p[t, h]
        m = -np.inf
        for j in range(n):
            acc = np.float32(0.0)
            for d in range(hd):
                acc += q[t, h, d] * k[j, h // g, d]
            row[j] = acc * scale
            m = max(m, row[j])
        total = 0.0
        for j in range(n):
            row[j] = np.exp(row[j] - m)
            total += row[j]
        inv = np.float32(1.0 / total)
        for j in range(n):
            row[j] *= inv
        for j in range(n, row.size):
            row[j] = 0


@njit(cache=True, nogil=True, parallel=True)
def attn_values(out, p, v):  # out f32[n_tok, n_head, hd_v], p f32[n_tok, n_head, n_kv], v f32[n_kv, n_head_kv, hd_v]
    n_tok, n_head, n_kv = p.shape
    g = n_head // v.shape[1]
    for th in prange(n_tok * n_head):
        t, h = th // n_head, th % n_head
        o = out[t, h]
        for d in range(o.size):
            o[d] = 0
        for j in range(n_kv):
            w = p[t, h, j]
            if w != 0:
                vj = v[j, h // g]
                for d in range(o.size):
                    o[d] += w * vj[d]


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int, scale: float) -> np.ndarray:
    """Causal GQA attention of n_tok queries at positions pos0.. over the cache.

    q f32[n_tok, n_head, hd]; k_cache/v_cache f16[>= pos0+n_tok, n_head_kv, hd]
    -> f32[n_tok, n_head * hd_v]. Like ggml's non-flash CPU path, q is rounded to
    fp16 for K·q and the softmax probabilities to fp16 for the V product.
    """
    n_tok, n_head, _ = q.shape
    n_kv = pos0 + n_tok
    p = np.empty((n_tok, n_head, n_kv), F32)                 # f32[n_tok, n_head, n_kv]
    attn_probs(p, round_f16(q), k_cache[:n_kv].astype(F32), pos0, F32(scale))
    out = np.empty((n_tok, n_head, v_cache.shape[2]), F32)   # f32[n_tok, n_head, hd_v]
    attn_values(out, round_f16(p), v_cache[:n_kv].astype(F32))
    return out.reshape(n_tok, -1)

"""Row-wise and element-wise kernels: RMS norm, RoPE, SwiGLU, adds, the KV-cache store, copies.

Each has a host wrapper taking device arrays (shapes in the comments). Rounding follows
localmoe.layers where it is cheap to (RMS norm sums squares in float64, RoPE rounds like
ggml's fma form), so the device path stays close to the CPU one.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64, int32

from .device import LAUNCH

NT = LAUNCH.tpr * LAUNCH.rpb  # threads of the one-block-per-row kernels and of flat kernels' blocks


def _flat_grid(n: int) -> int:
    return max(1, min((n + NT - 1) // NT, 65535))


@cuda.jit
def _rms_norm(out, x, w, eps):  # out/x f32[n_rows, n], w f32[n] (or f32[0]: no weight)
    row, tx = cuda.blockIdx.x, cuda.threadIdx.x
    part = cuda.shared.array(NT, float64)
    n = x.shape[1]
    acc = float64(0.0)
    for i in range(tx, n, NT):
        v = x[row, i]
        acc += float64(v * v)
    part[tx] = acc
    cuda.syncthreads()
    step = NT // 2
    while step > 0:
        if tx < step:
            part[tx] += part[tx + step]
        cuda.syncthreads()
        step //= 2
    scale = float32(1.0) / math.sqrt(float32(part[0] / n) + float32(eps))
    for i in range(tx, n, NT):
        y = x[row, i] * scale
        out[row, i] = y * w[i] if w.shape[0] else y


def rms_norm(out, x, w, eps: float, stream=0) -> None:
    """out f32[n_rows, n] = rms_norm(x f32[n_rows, n]) * w f32[n]; out may be x."""
    _rms_norm[x.shape[0], NT, stream](out, x, w, float32(eps))


@cuda.jit
def _rope(x, cos, sin, p0, neox):  # x f32[n_tok, n_heads, hd] in place; cos/sin f32[n_ctx, half]
    n_tok, n_heads = x.shape[0], x.shape[1]
    half = cos.shape[1]
    i0 = cuda.grid(1)
    for i in range(i0, n_tok * n_heads * half, cuda.gridsize(1)):
        t, rem = i // (n_heads * half), i % (n_heads * half)
        h, j = rem // half, rem % half
        ia, ib = (j, j + half) if neox else (2 * j, 2 * j + 1)
        a, b = x[t, h, ia], x[t, h, ib]
        c, s = cos[p0 + t, j], sin[p0 + t, j]
        # as layers.apply_rope: a*c - fl(b*s) and a*s + fl(b*c), each rounded once
        x[t, h, ia] = float32(float64(a) * float64(c) - float64(b * s))
        x[t, h, ib] = float32(float64(a) * float64(s) + float64(b * c))


def rope(x, cos, sin, p0: int, neox: bool, stream=0) -> None:
    """In place: x f32[n_tok, n_heads, hd] at positions p0..; cos/sin f32[n_ctx, n_rot/2] tables."""
    n = x.shape[0] * x.shape[1] * cos.shape[1]
    _rope[_flat_grid(n), NT, stream](x, cos, sin, int32(p0), bool(neox))


@cuda.jit
def _swiglu(out, g, u):  # out/g/u f32[n_rows, n]; g has 0 rows: silu(u) alone
    n = u.shape[1]
    for i in range(cuda.grid(1), u.shape[0] * n, cuda.gridsize(1)):
        r, c = i // n, i % n
        if g.shape[0]:
            v = g[r, c]
            out[r, c] = v / (float32(1.0) + math.exp(-v)) * u[r, c]
        else:
            v = u[r, c]
            out[r, c] = v / (float32(1.0) + math.exp(-v))


def swiglu(out, g, u, stream=0) -> None:
    """out = silu(g) * u (or silu(u) when g has no rows), f32[n_rows, n] each."""
    _swiglu[_flat_grid(u.shape[0] * u.shape[1]), NT, stream](out, g, u)


@cuda.jit
def _fill(out, v):  # f32[n] (flattened)
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = v


def fill(out, value: float, stream=0) -> None:
    """out[...] = value for a contiguous f32 device array."""
    o = out.reshape(out.size)
    _fill[_flat_grid(o.shape[0]), NT, stream](o, float32(value))


@cuda.jit
def _add(out, a, b):  # f32[n] each (flattened)
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = a[i] + b[i]


def add(out, a, b, stream=0) -> None:
    """out = a + b for device arrays of one shape (out may be a or b)."""
    o, x, y = out.reshape(out.size), a.reshape(a.size), b.reshape(b.size)
    _add[_flat_grid(o.shape[0]), NT, stream](o, x, y)


@cuda.jit
def _add_rows(out, bias):  # out f32[n_rows, n] += bias f32[n]
    n = out.shape[1]
    for i in range(cuda.grid(1), out.shape[0] * n, cuda.gridsize(1)):
        out[i // n, i % n] += bias[i % n]


def add_bias(out, bias, stream=0) -> None:
    _add_rows[_flat_grid(out.shape[0] * out.shape[1]), NT, stream](out, bias)


@cuda.jit
def _weighted_sum(out, y, perm, start, wts):
    # out f32[n_tok, n]; y f32[n_rows, n]; perm i32[n_slot]: y row of slot s; start i32[n_tok + 1]; wts f32[n_slot]
    n = out.shape[1]
    for i in range(cuda.grid(1), out.shape[0] * n, cuda.gridsize(1)):
        t, c = i // n, i % n
        acc = out[t, c]
        for s in range(start[t], start[t + 1]):
            acc += y[perm[s], c] * wts[s]
        out[t, c] = acc


def weighted_sum(out, y, perm, start, wts, stream=0) -> None:
    """out[t] += sum of wts[s] * y[perm[s]] over the slots s of token t (start[t]..start[t+1], in slot order)."""
    _weighted_sum[_flat_grid(out.shape[0] * out.shape[1]), NT, stream](out, y, perm, start, wts)


@cuda.jit
def _kv_store(cache, x, p0):
    # cache f16[n_ctx, n_kv, hd] (may be a column view); x f32[n_tok, n_kv or 1, hd]: one head goes to all
    n_kv, hd = cache.shape[1], cache.shape[2]
    one = x.shape[1] == 1
    for i in range(cuda.grid(1), x.shape[0] * n_kv * hd, cuda.gridsize(1)):
        t, rem = i // (n_kv * hd), i % (n_kv * hd)
        h, d = rem // hd, rem % hd
        cache[p0 + t, h, d] = np.float16(x[t, 0 if one else h, d])


def kv_store(cache, x, p0: int, stream=0) -> None:
    """cache f16[n_ctx, n_kv, hd][p0:p0+n_tok] = x f32[n_tok, n_kv, hd] (rounded to fp16); x with one
    head is stored in every head (MLA's shared roped key in the legacy kv_b form). Either may be a view."""
    n = x.shape[0] * cache.shape[1] * cache.shape[2]
    _kv_store[_flat_grid(n), NT, stream](cache, x, int32(p0))


@cuda.jit
def _copy3(out, x):  # out/x f32[a, b, c], either a strided view
    b, c = x.shape[1], x.shape[2]
    for i in range(cuda.grid(1), x.shape[0] * b * c, cuda.gridsize(1)):
        t, rem = i // (b * c), i % (b * c)
        out[t, rem // c, rem % c] = x[t, rem // c, rem % c]


def copy3(out, x, stream=0) -> None:
    """out = x for f32[a, b, c] arrays or views (MLA: the roped q columns beside the absorbed ones)."""
    _copy3[_flat_grid(x.shape[0] * x.shape[1] * x.shape[2]), NT, stream](out, x)


@cuda.jit
def _add_gated(out, y, g):  # out/y f32[n_tok, n]; g f32[n_tok, 1]: the shared-expert gate logit
    n = out.shape[1]
    for i in range(cuda.grid(1), out.shape[0] * n, cuda.gridsize(1)):
        t, c = i // n, i % n
        gate = float32(1.0) / (float32(1.0) + math.exp(-g[t, 0]))  # as layers.sigmoid
        out[t, c] += y[t, c] * gate


def add_gated(out, y, g, stream=0) -> None:
    """out += y * sigmoid(g) row by row: qwen2moe's shared expert y f32[n_tok, n] gated by g f32[n_tok, 1]."""
    _add_gated[_flat_grid(out.shape[0] * out.shape[1]), NT, stream](out, y, g)

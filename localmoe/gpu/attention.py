"""Causal GQA attention over the fp16 KV cache in device memory.

One block per (head, token): its threads take the cache positions in turn for the
scores, share the max and the sum through shared memory, then take the output
dimensions. As localmoe.layers.attention (ggml's non flash-attention path): q is
rounded to fp16 for K.q and the probabilities to fp16 for the V product.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int32

from .device import LAUNCH

NT = LAUNCH.tpr * LAUNCH.rpb


@cuda.jit(device=True, inline=True)
def _block_reduce(part, v, tx, is_max):  # -> max or sum of v over the block's threads
    part[tx] = v
    cuda.syncthreads()
    step = NT // 2
    while step > 0:
        if tx < step:
            part[tx] = max(part[tx], part[tx + step]) if is_max else part[tx] + part[tx + step]
        cuda.syncthreads()
        step //= 2
    r = part[0]
    cuda.syncthreads()
    return r


@cuda.jit
def _attention(out, p, q, kc, vc, p0, scale):
    # out f32[n_tok, n_head, hd_v]; p f32[n_tok, n_head, n_ctx] scratch; q f32[n_tok, n_head, hd_k];
    # kc f16[n_ctx, n_head_kv, hd_k]; vc f16[n_ctx, n_head_kv, hd_v]
    h, t, tx = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    part = cuda.shared.array(NT, float32)
    kvh = h // (q.shape[1] // kc.shape[1])
    n_kv = p0 + t + 1
    m = float32(-math.inf)
    for j in range(tx, n_kv, NT):
        s = float32(0.0)
        for d in range(q.shape[2]):
            s += float32(np.float16(q[t, h, d])) * float32(kc[j, kvh, d])
        s *= scale
        p[t, h, j] = s
        m = max(m, s)
    m = _block_reduce(part, m, tx, True)
    z = float32(0.0)
    for j in range(tx, n_kv, NT):
        e = math.exp(p[t, h, j] - m)
        p[t, h, j] = e
        z += e
    z = _block_reduce(part, z, tx, False)
    inv = float32(1.0) / z
    for j in range(tx, n_kv, NT):
        p[t, h, j] = float32(np.float16(p[t, h, j] * inv))
    cuda.syncthreads()
    for d in range(tx, vc.shape[2], NT):
        acc = float32(0.0)
        for j in range(n_kv):
            acc += p[t, h, j] * float32(vc[j, kvh, d])
        out[t, h, d] = acc


def attention(out, p, q, kc, vc, p0: int, scale: float, stream=0) -> None:
    """out f32[n_tok, n_head, hd_v] for queries q f32[n_tok, n_head, hd_k] at positions p0.. over
    the cache rows 0..p0+t (kc/vc f16[n_ctx, n_head_kv, hd]); p f32[n_tok, n_head, n_ctx] scratch."""
    _attention[(q.shape[1], q.shape[0]), NT, stream](out, p, q, kc, vc, int32(p0), float32(scale))

"""The gathered matvec: out[s, r] = W[ids[s]][r] . x[xrow[s]], every slot s in one launch.

One kernel shape serves decode over a stack of selected experts (llama.cpp's
mul_mat_id: slots = the k selected experts, ids = their VRAM slots), dense
matvecs (one matrix, ids = 0) and prefill (slots = tokens, or (token, expert)
pairs). Weights stay GGUF rows as stored, u8[n_mat * n_rows, row_bytes]; each
type supplies `unit_dot(w, wh, r, u, x, xr)`: the u-th run of 32 weights of row r
(of the flattened stack: a Q8_0 block, one scale group of 32 of a K-quant block,
32 floats) dotted with x[xr, 32u:32u+32] (wh: the same bytes viewed as fp16, for
the block scales).

Launch: a block of (LAUNCH.tpr, LAUNCH.rpb) threads covers rpb rows; the tpr
threads of a row take its 32-weight units in turn (a 2048-wide K-quant row keeps
64 units for 32 threads, neighbours reading neighbouring bytes) and add their
partial sums in shared memory (a tree, no warp shuffles: the simulator runs it
as it is).
Prefill reads a row once per token here: correct first, a tiled matmul later.
"""
from __future__ import annotations

import importlib

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import cuda, float32, int32

from localmoe.errors import UnsupportedError

from .device import LAUNCH

# qtype -> module with unit_dot (F32: unit_dot_f32)
_MODULES = {T.Q8_0: "q8_0", T.Q4_K: "q4_k", T.Q6_K: "q6_k", T.Q3_K: "q3_k", T.F16: "floats", T.F32: "floats"}
_KERNELS: dict = {}


def make_kernel(unit_dot):
    tpr, rpb = LAUNCH.tpr, LAUNCH.rpb

    @cuda.jit
    def gathered_matvec(out, x, w, wh, ids, xrow, n_rows):
        # out f32[n_slot, n_rows]; x f32[n_x, n_cols]; w [n_mat * n_rows, row_len] (u8 blocks, or f16/f32);
        # wh: w's bytes as f16; ids i32[n_slot]: matrix of slot s; xrow i32[n_slot]: its x row
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        r = cuda.blockIdx.x * rpb + ty
        s = cuda.blockIdx.y
        part = cuda.shared.array((rpb, tpr), float32)
        acc = float32(0.0)
        if r < n_rows:
            wr = ids[s] * n_rows + r
            xr = xrow[s]
            for u in range(tx, (x.shape[1] + 31) // 32, tpr):
                acc += unit_dot(w, wh, wr, u, x, xr)
        part[ty, tx] = acc
        cuda.syncthreads()
        step = tpr // 2
        while step > 0:
            if tx < step:
                part[ty, tx] += part[ty, tx + step]
            cuda.syncthreads()
            step //= 2
        if tx == 0 and r < n_rows:
            out[s, r] = part[ty, 0]

    return gathered_matvec


def _module(qtype):
    name = _MODULES.get(T(qtype))
    if name is None:
        raise UnsupportedError(f"no CUDA kernel for {T(qtype).name} weights "
                               f"(CUDA: {', '.join(t.name for t in _MODULES)})")
    return importlib.import_module(f"{__package__}.{name}")


def supported(qtype) -> bool:
    return T(qtype) in _MODULES


def weight_views(qtype, w):
    """(w, wh) for the kernel from a device u8[n, row_bytes] of GGUF rows: float weights are viewed
    as their own dtype (f16/f32 elements), block types stay u8 with an f16 view for the scales."""
    qtype = T(qtype)
    if qtype == T.F32:
        v = w.view(np.float32)
        return v, v
    h = w.view(np.float16)
    return (h, h) if qtype == T.F16 else (w, h)


def gathered_matvec(qtype, out, x, w, ids, xrow, n_rows: int, stream=0) -> None:
    """out f32[n_slot, n_rows] (device) = W[ids[s]] @ x[xrow[s]] for each slot s.
    x f32[n_x, n_cols], w u8[n_mat * n_rows, row_bytes], ids/xrow i32[n_slot] (all device arrays)."""
    qtype = T(qtype)
    k = _KERNELS.get(qtype)
    if k is None:
        mod = _module(qtype)
        k = _KERNELS[qtype] = make_kernel(mod.unit_dot_f32 if qtype == T.F32 else mod.unit_dot)
    n_slot = out.shape[0]
    if n_slot == 0 or n_rows == 0:
        return
    wv, wh = weight_views(qtype, w)
    grid = ((n_rows + LAUNCH.rpb - 1) // LAUNCH.rpb, n_slot)
    k[grid, (LAUNCH.tpr, LAUNCH.rpb), stream](out, x, wv, wh, ids, xrow, int32(n_rows))

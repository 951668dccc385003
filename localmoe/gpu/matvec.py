"""The gathered matvec: out[s, r] = W[ids[s]][r] . x[xrow[s]], every slot s in one launch.

One kernel shape serves decode over a stack of selected experts (llama.cpp's
mul_mat_id: slots = the k selected experts, ids = their VRAM slots), dense
matvecs (one matrix, ids = 0) and prefill (slots = tokens, or (token, expert)
pairs sorted by expert). Weights stay GGUF rows as stored, u8[n_mat * n_rows,
row_bytes]; each type supplies `dequant_unit(w, wh, r, u, y)`: the u-th run of 32
weights of row r of the flattened stack (a Q8_0 block, one scale group of 32 of a
K-quant block, 32 floats) into y f32[32] (wh: the same bytes viewed as fp16, for
the block scales).

Launch: a block of (LAUNCH.tpr, LAUNCH.rpb) threads covers rpb rows and `tile`
consecutive slots; the tpr threads of a row take its 32-weight units in turn (a
2048-wide K-quant row has 64 units for 32 threads, neighbours reading
neighbouring bytes), decode each unit once and dot it with the x rows of every
slot of the tile that uses the same matrix (prefill: a weight row is read once per
TILE slots, not once per token; decode: tile 1), then add their partial sums in
shared memory (a tree, no warp shuffles: the simulator runs it as it is).
"""
from __future__ import annotations

import importlib

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import cuda, float32, int32

from localmoe.errors import UnsupportedError

from .device import LAUNCH

# qtype -> module with dequant_unit (F32: dequant_unit_f32)
_MODULES = {T.Q8_0: "q8_0", T.Q4_K: "q4_k", T.Q6_K: "q6_k", T.Q3_K: "q3_k", T.F16: "floats", T.F32: "floats"}
_KERNELS: dict = {}
TILE = 8  # slots per block for a batch (prefill); decode uses 1


def make_kernel(dequant_unit, tile: int):
    tpr, rpb = LAUNCH.tpr, LAUNCH.rpb

    @cuda.jit
    def gathered_matvec(out, x, w, wh, ids, xrow, n_rows):
        # out f32[n_slot, n_rows]; x f32[n_x, n_cols]; w [n_mat * n_rows, row_len] (u8 blocks, or f16/f32);
        # wh: w's bytes as f16; ids i32[n_slot]: matrix of slot s; xrow i32[n_slot]: its x row
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        r = cuda.blockIdx.x * rpb + ty
        s0 = cuda.blockIdx.y * tile
        nt = min(tile, out.shape[0] - s0)
        part = cuda.shared.array((rpb, tpr), float32)
        acc = cuda.local.array(tile, float32)
        y = cuda.local.array(32, float32)
        n_cols = x.shape[1]
        for t in range(tile):
            acc[t] = float32(0.0)
        if r < n_rows:
            for u in range(tx, (n_cols + 31) // 32, tpr):
                cur = -1
                for t in range(nt):
                    if ids[s0 + t] != cur:  # slots sorted by matrix decode each unit once
                        cur = ids[s0 + t]
                        dequant_unit(w, wh, cur * n_rows + r, u, y)
                    xr = xrow[s0 + t]
                    s = float32(0.0)
                    for j in range(min(32, n_cols - 32 * u)):
                        s += y[j] * x[xr, 32 * u + j]
                    acc[t] += s
        for t in range(tile):
            part[ty, tx] = acc[t]
            cuda.syncthreads()
            step = tpr // 2
            while step > 0:
                if tx < step:
                    part[ty, tx] += part[ty, tx + step]
                cuda.syncthreads()
                step //= 2
            if tx == 0 and r < n_rows and t < nt:
                out[s0 + t, r] = part[ty, 0]
            cuda.syncthreads()

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
    x f32[n_x, n_cols], w u8[n_mat * n_rows, row_bytes], ids/xrow i32[n_slot] (all device arrays).
    A batch (n_slot >= 2 * TILE) runs TILE slots a block: sort its slots by matrix."""
    qtype = T(qtype)
    n_slot = out.shape[0]
    if n_slot == 0 or n_rows == 0:
        return
    tile = TILE if n_slot >= 2 * TILE else 1
    k = _KERNELS.get((qtype, tile))
    if k is None:
        mod = _module(qtype)
        k = _KERNELS[qtype, tile] = make_kernel(mod.dequant_unit_f32 if qtype == T.F32 else mod.dequant_unit, tile)
    wv, wh = weight_views(qtype, w)
    grid = ((n_rows + LAUNCH.rpb - 1) // LAUNCH.rpb, (n_slot + tile - 1) // tile)
    k[grid, (LAUNCH.tpr, LAUNCH.rpb), stream](out, x, wv, wh, ids, xrow, int32(n_rows))

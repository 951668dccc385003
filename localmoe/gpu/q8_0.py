"""Q8_0: 32 weights per 34-byte block, d fp16 then 32 int8 quants. Weight = d * q.
A 32-weight unit is one block."""
from numba import cuda, float32, int32

TYPE_SIZE = 34


@cuda.jit(device=True, inline=True)
def unit_dot(w, wh, r, u, x, xr):  # w u8[rows, row_bytes], wh f16 view; x f32[n_x, n_cols] -> f32
    o = u * TYPE_SIZE
    s = float32(0.0)
    for j in range(32):
        q = int32(w[r, o + 2 + j])
        q -= (q & 128) << 1  # u8 -> i8
        s += float32(q) * x[xr, 32 * u + j]
    return float32(wh[r, o // 2]) * s

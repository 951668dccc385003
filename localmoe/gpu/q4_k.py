"""Q4_K: 256 weights per 144-byte block: d, dmin fp16; 12 bytes of 6-bit scales and mins
for 8 groups of 32; 128 bytes of nibbles (bytes 32j.. hold groups 2j (low) and 2j+1 (high)).
Weight = d * scale_g * q - dmin * min_g. A 32-weight unit is one group."""
from numba import cuda, float32, int32

TYPE_SIZE = 144


@cuda.jit(device=True, inline=True)
def scale_min(w, r, o, g):  # o: offset of the 12 scale bytes; group g < 8 -> (scale, min) 6-bit
    if g < 4:
        return int32(w[r, o + g]) & 63, int32(w[r, o + g + 4]) & 63
    a, lo, hi = int32(w[r, o + g + 4]), int32(w[r, o + g - 4]), int32(w[r, o + g])
    return (a & 15) | ((lo >> 6) << 4), (a >> 4) | ((hi >> 6) << 4)


@cuda.jit(device=True, inline=True)
def unit_dot(w, wh, r, u, x, xr):  # w u8[rows, row_bytes], wh f16 view; x f32[n_x, n_cols] -> f32
    o, g = (u // 8) * TYPE_SIZE, u % 8
    sc, mn = scale_min(w, r, o + 4, g)
    shift = 4 * (g & 1)
    qo = o + 16 + 32 * (g >> 1)
    s = float32(0.0)
    sx = float32(0.0)
    for l in range(32):
        xv = x[xr, 32 * u + l]
        s += float32((int32(w[r, qo + l]) >> shift) & 15) * xv
        sx += xv
    return float32(wh[r, o // 2]) * float32(sc) * s - float32(wh[r, o // 2 + 1]) * float32(mn) * sx

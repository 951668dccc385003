"""Q4_K: 256 weights per 144-byte block: d, dmin fp16; 12 bytes of 6-bit scales and mins
for 8 groups of 32; 128 bytes of nibbles (bytes 32j.. hold groups 2j (low) and 2j+1 (high)).
Weight = d * scale_g * q - dmin * min_g."""
from numba import cuda, float32, int32

QK = 256
TYPE_SIZE = 144


@cuda.jit(device=True, inline=True)
def scale_min(w, r, o, g):  # o: offset of the 12 scale bytes; group g < 8 -> (scale, min) 6-bit
    if g < 4:
        return int32(w[r, o + g]) & 63, int32(w[r, o + g + 4]) & 63
    a, lo, hi = int32(w[r, o + g + 4]), int32(w[r, o + g - 4]), int32(w[r, o + g])
    return (a & 15) | ((lo >> 6) << 4), (a >> 4) | ((hi >> 6) << 4)


@cuda.jit(device=True, inline=True)
def block_dot(w, wh, r, b, x, xr):
    o = b * TYPE_SIZE
    xo = b * QK
    d, dmin = float32(wh[r, o // 2]), float32(wh[r, o // 2 + 1])
    acc = float32(0.0)
    for g in range(8):
        sc, mn = scale_min(w, r, o + 4, g)
        shift = 4 * (g & 1)
        qo = o + 16 + 32 * (g >> 1)
        s = float32(0.0)
        sx = float32(0.0)
        for l in range(32):
            xv = x[xr, xo + 32 * g + l]
            s += float32((int32(w[r, qo + l]) >> shift) & 15) * xv
            sx += xv
        acc += d * float32(sc) * s - dmin * float32(mn) * sx
    return acc

"""Q4_K: 256 weights per 144-byte block: d, dmin fp16; 12 bytes of 6-bit scales and mins
for 8 groups of 32; 128 bytes of nibbles (bytes 32j.. hold groups 2j (low) and 2j+1 (high)).
Weight = (d * scale_g) * q - (dmin * min_g), as ggml's dequantize_row_q4_K. A 32-weight
unit is one group."""
from numba import cuda, float32, int32

TYPE_SIZE = 144


@cuda.jit(device=True, inline=True)
def scale_min(w, r, o, g):  # o: offset of the 12 scale bytes; group g < 8 -> (scale, min) 6-bit
    if g < 4:
        return int32(w[r, o + g]) & 63, int32(w[r, o + g + 4]) & 63
    a, lo, hi = int32(w[r, o + g + 4]), int32(w[r, o + g - 4]), int32(w[r, o + g])
    return (a & 15) | ((lo >> 6) << 4), (a >> 4) | ((hi >> 6) << 4)


@cuda.jit(device=True, inline=True)
def dequant_unit(w, wh, r, u, y):  # w u8[rows, row_bytes], wh: its f16 view -> y f32[32]: unit u of row r
    o, g = (u // 8) * TYPE_SIZE, u % 8
    sc, mn = scale_min(w, r, o + 4, g)
    d = float32(wh[r, o // 2]) * float32(sc)
    m = float32(wh[r, o // 2 + 1]) * float32(mn)
    shift = 4 * (g & 1)
    qo = o + 16 + 32 * (g >> 1)
    for l in range(32):
        y[l] = d * float32((int32(w[r, qo + l]) >> shift) & 15) - m

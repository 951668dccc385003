"""Q3_K: 256 weights per 110-byte block: hmask[32] (the third bit), qs[64] (2-bit pairs),
12 bytes of 6-bit scales for 16 groups of 16, d fp16. Element 128n + 32j + l (l < 32): bits 2j
of qs[32n + l], high bit 4n + j of hmask[l] (clear: subtract 4), scale 8n + 2j + l // 16.
Weight = d * (scale - 32) * q. A 32-weight unit is one (n, j): two scale groups."""
from numba import cuda, float32, int32

TYPE_SIZE = 110


@cuda.jit(device=True, inline=True)
def scale(w, r, o, g):  # o: offset of the 12 scale bytes; group g < 16 -> scale - 32
    lo = (int32(w[r, o + g]) & 15) if g < 8 else (int32(w[r, o + g - 8]) >> 4)
    hi = (int32(w[r, o + 8 + (g % 4)]) >> (2 * (g // 4))) & 3
    return (lo | (hi << 4)) - 32


@cuda.jit(device=True, inline=True)
def dequant_unit(w, wh, r, u, y):  # w u8[rows, row_bytes], wh: its f16 view -> y f32[32]: unit u of row r
    o, c = (u // 8) * TYPE_SIZE, u % 8
    n, j = c // 4, c % 4
    d = float32(wh[r, (o + 108) // 2])
    for g in range(2):
        dl = d * float32(scale(w, r, o + 96, 2 * c + g))
        for l in range(16 * g, 16 * g + 16):
            q = (int32(w[r, o + 32 + 32 * n + l]) >> (2 * j)) & 3
            if (int32(w[r, o + l]) >> (4 * n + j)) & 1 == 0:
                q -= 4
            y[l] = dl * float32(q)

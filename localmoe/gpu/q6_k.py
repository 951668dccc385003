"""Q6_K: 256 weights per 210-byte block: ql[128] low nibbles, qh[64] high bit pairs,
int8 scales[16] (one per 16 weights), d fp16. Element 128h + 32k + l (l < 32): nibble k // 2
of ql[64h + 32(k % 2) + l], bits 2k of qh[32h + l]. Weight = d * scale * (q - 32).
A 32-weight unit is one (h, k): two scale groups."""
from numba import cuda, float32, int32

TYPE_SIZE = 210


@cuda.jit(device=True, inline=True)
def dequant_unit(w, wh, r, u, y):  # w u8[rows, row_bytes], wh: its f16 view -> y f32[32]: unit u of row r
    o, c = (u // 8) * TYPE_SIZE, u % 8
    h, k = c // 4, c % 4
    lo_o = o + 64 * h + 32 * (k % 2)
    lo_shift = 4 * (k // 2)
    d = float32(wh[r, (o + 208) // 2])
    for l in range(32):
        sc = int32(w[r, o + 192 + 2 * c + l // 16])
        sc -= (sc & 128) << 1
        q = ((int32(w[r, lo_o + l]) >> lo_shift) & 15) | (((int32(w[r, o + 128 + 32 * h + l]) >> (2 * k)) & 3) << 4)
        y[l] = d * float32(sc) * float32(q - 32)

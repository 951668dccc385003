"""Q8_0: 32 weights per 34-byte block, d fp16 then 32 int8 quants. Weight = d * q.
A 32-weight unit is one block."""
from numba import cuda, float32, int32

TYPE_SIZE = 34


@cuda.jit(device=True, inline=True)
def dequant_unit(w, wh, r, u, y):  # w u8[rows, row_bytes], wh: its f16 view -> y f32[32]: unit u of row r
    o = u * TYPE_SIZE
    d = float32(wh[r, o // 2])
    for j in range(32):
        q = int32(w[r, o + 2 + j])
        y[j] = d * float32(q - ((q & 128) << 1))  # u8 -> i8

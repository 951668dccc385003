"""Q6_K: 256 weights per 210-byte block: ql[128] low nibbles, qh[64] high bit pairs,
int8 scales[16] (one per 16 weights), d fp16. Element 128h + 32k + l (l < 32): nibble k // 2
of ql[64h + 32(k % 2) + l], bits 2k of qh[32h + l]. Weight = d * scale * (q - 32)."""
from numba import cuda, float32, int32

QK = 256
TYPE_SIZE = 210


@cuda.jit(device=True, inline=True)
def block_dot(w, wh, r, b, x, xr):
    o = b * TYPE_SIZE
    xo = b * QK
    acc = float32(0.0)
    for h in range(2):
        for k in range(4):
            lo_o = o + 64 * h + 32 * (k % 2)
            lo_shift = 4 * (k // 2)
            for g in range(2):  # two scale groups of 16
                sc = int32(w[r, o + 192 + 8 * h + 2 * k + g])
                sc -= (sc & 128) << 1
                s = float32(0.0)
                for l in range(16 * g, 16 * g + 16):
                    q = ((int32(w[r, lo_o + l]) >> lo_shift) & 15) | (((int32(w[r, o + 128 + 32 * h + l]) >> (2 * k)) & 3) << 4)
                    s += float32(q - 32) * x[xr, xo + 128 * h + 32 * k + l]
                acc += float32(sc) * s
    return float32(wh[r, (o + 208) // 2]) * acc

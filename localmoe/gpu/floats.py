"""F16 / F32 weights: rows of plain elements (the kernel gets them viewed as f16 or f32);
a "block" is QK elements, the last one cut at the row's end."""
from numba import cuda, float32

QK = 32


@cuda.jit(device=True, inline=True)
def block_dot(w, wh, r, b, x, xr):  # w f16[rows, n_cols]
    s = float32(0.0)
    for j in range(b * QK, min(b * QK + QK, x.shape[1])):
        s += float32(w[r, j]) * x[xr, j]
    return s


block_dot_f32 = block_dot  # same source; numba compiles it per weight dtype

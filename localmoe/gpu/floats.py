"""F16 / F32 weights: rows of plain elements (the kernel gets them viewed as f16 or f32);
a 32-weight unit is 32 elements, the last one cut at the row's end."""
from numba import cuda, float32


@cuda.jit(device=True, inline=True)
def unit_dot(w, wh, r, u, x, xr):  # w f16[rows, n_cols] (or f32); x f32[n_x, n_cols] -> f32
    s = float32(0.0)
    for j in range(32 * u, min(32 * u + 32, x.shape[1])):
        s += float32(w[r, j]) * x[xr, j]
    return s


unit_dot_f32 = unit_dot  # same source; numba compiles it per weight dtype

"""F16 / F32 weights: rows of plain elements (the kernel gets them viewed as f16 or f32);
a 32-weight unit is 32 elements; past the row's end (a partial last unit) it is zero."""
from numba import cuda, float32


@cuda.jit(device=True, inline=True)
def dequant_unit(w, wh, r, u, y):  # w f16[rows, n_cols] (or f32) -> y f32[32]: elements 32u.. of row r
    n = w.shape[1]
    for j in range(32):
        y[j] = float32(w[r, 32 * u + j]) if 32 * u + j < n else float32(0.0)


dequant_unit_f32 = dequant_unit  # same source; numba compiles it per weight dtype

"""Q3_K kernels against gguf-py and float64 references (helpers in quant_helpers)."""
import numpy as np
from gguf import GGMLQuantizationType as T

from localmoe.quant import dequantize
from quant_helpers import (abs_weights, assert_api_any_shape, assert_dequantize_bit_exact,
                             assert_matmul_rows_equal_matvec, assert_matvec_close,
                             assert_quantized_activation_reuse)


def test_q3_k_dequantize_bit_exact():
    assert_dequantize_bit_exact(T.Q3_K)


def test_q3_k_matvec():
    assert_matvec_close(T.Q3_K, abs_weights(T.Q3_K))


def test_q3_k_matmul_rows_equal_matvec():
    from localmoe.quant.q3_k import TILED_MIN_BATCH
    assert_matmul_rows_equal_matvec(T.Q3_K, batch_formula_from=TILED_MIN_BATCH)


def test_q3_k_api_any_shape():
    assert_api_any_shape(T.Q3_K)


def test_q3_k_quantized_activation_reuse():
    assert_quantized_activation_reuse(T.Q3_K)


def test_q3_k_scales_unpacking():
    """Each of the 16 six-bit scales, set alone to 63 (-> +31), scales only its own 16 weights."""
    raw = np.zeros((16, 110), np.uint8)
    raw[:, 0:32] = 0xFF  # every hmask bit set: q = low2 bits
    raw[:, 32:96] = 0x55  # low2 = 1 everywhere: q = 1
    raw[:, 96:104] = 0x00  # all other scales: low 4 bits 0 ...
    raw[:, 104:108] = 0xAA  # ... high 2 bits 0b10: 32 -> scale 0
    raw[:, 108:110] = np.array([0x3C00], "<u2").view(np.uint8)  # d = 1
    for s in range(16):
        raw[s, 96 + s % 8] |= 0xF << (4 * (s // 8))
        raw[s, 104 + s % 4] |= 3 << (2 * (s // 4))
    want = np.zeros((16, 256), np.float32)
    for s in range(16):
        want[s, 16 * s:16 * s + 16] = 31
    np.testing.assert_array_equal(dequantize(raw, T.Q3_K, (16, 256)), want, err_msg="Q3_K scale positions (exact)")

"""Q2_K kernels against gguf-py and float64 references (helpers in quant_helpers)."""
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from quant_helpers import (assert_api_any_shape, assert_dequantize_bit_exact,
                             assert_matmul_rows_equal_matvec, assert_matvec_close,
                             assert_quantized_activation_reuse)


def term_magnitude(raw):
    """|d*scale*q| + |dmin*min| per weight: dequantize with d -> |d|, dmin -> -|dmin|.

    The kernel computes the two terms separately (min via Q8_K bsums), so its
    rounding error scales with them, not with their possibly cancelling difference.
    """
    blocks = raw.reshape(raw.shape[0], -1, 84).copy()
    blocks[:, :, 81] &= 0x7F
    blocks[:, :, 83] |= 0x80
    return gguf_dequantize(blocks.reshape(raw.shape), T.Q2_K).astype(np.float64).reshape(raw.shape[0], -1)


def test_q2_k_dequantize_bit_exact():
    assert_dequantize_bit_exact(T.Q2_K)


def test_q2_k_matvec():
    assert_matvec_close(T.Q2_K, term_magnitude)


def test_q2_k_matmul_rows_equal_matvec():
    assert_matmul_rows_equal_matvec(T.Q2_K)


def test_q2_k_api_any_shape():
    assert_api_any_shape(T.Q2_K)


def test_q2_k_quantized_activation_reuse():
    assert_quantized_activation_reuse(T.Q2_K)

"""Q6_K kernels against gguf-py and float64 references (helpers in quant_helpers)."""
import numpy as np
from gguf import GGMLQuantizationType as T

from localmoe.quant import dequantize
from quant_helpers import (abs_weights, assert_api_any_shape, assert_dequantize_bit_exact,
                           assert_matmul_rows_equal_matvec, assert_matvec_close,
                           assert_quantized_activation_reuse)


def test_q6_k_dequantize_bit_exact():
    assert_dequantize_bit_exact(T.Q6_K)


def test_q6_k_matvec():
    assert_matvec_close(T.Q6_K, abs_weights(T.Q6_K))


def test_q6_k_matmul_rows_equal_matvec():
    assert_matmul_rows_equal_matvec(T.Q6_K)


def test_q6_k_api_any_shape():
    assert_api_any_shape(T.Q6_K)


def test_q6_k_quantized_activation_reuse():
    assert_quantized_activation_reuse(T.Q6_K)


def test_q6_k_layout_single_element():
    """One nonzero quant at each position lands where ggml's layout puts it."""
    raw = np.zeros((256, 210), np.uint8)
    raw[:, 192:208] = 1  # scales
    raw[:, 208:210] = np.array([0x3C00], "<u2").view(np.uint8)  # d = 1
    for e in range(256):
        h, k, l = e // 128, (e % 128) // 32, e % 32
        # q = 33 (-> weight 1): low nibble 1, high bits 0b10
        raw[e, 64 * h + 32 * (k & 1) + l] = 1 << (4 * (k >> 1))
        raw[e, 128 + 32 * h + l] = 2 << (2 * k)
    # all other elements have q = 0 -> weight -32
    want = np.full((256, 256), -32.0, np.float32)
    np.fill_diagonal(want, 1.0)
    np.testing.assert_array_equal(dequantize(raw, T.Q6_K, (256, 256)), want, err_msg="Q6_K element positions (exact)")

"""Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 and F16/BF16 quantizers against llama.cpp, byte for byte.

Two oracles: llama_model_quantize on a small F32 GGUF (params.pure, so every
2-D weight gets the type under test: the path llama-quantize takes), and
ggml_quantize_chunk called directly through ctypes for inputs a model file
cannot carry (NaN, overflow).
"""
import gguf
import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from localmoe.quant import quant_type
from quant_helpers import FLOAT_KINDS, float_rows, ggml_quantize, write_f32_model

pytestmark = pytest.mark.reference

FTYPE = {T.Q8_0: llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, T.Q4_0: llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
         T.Q4_1: llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1, T.Q5_0: llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
         T.Q5_1: llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1, T.F16: llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
         T.BF16: llama_cpp.LLAMA_FTYPE_MOSTLY_BF16}

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    rng = np.random.default_rng(1234)
    tensors = {f"blk.{i}.ffn_up.weight": float_rows(rng, k) for i, k in enumerate(FLOAT_KINDS)}
    path = tmp_path_factory.mktemp("legacy") / "f32.gguf"
    write_f32_model(path, tensors)
    return path, tensors


@pytest.mark.parametrize("qtype", list(FTYPE), ids=lambda q: q.name)
def test_same_bytes_as_llama_model_quantize(source, tmp_path, qtype):
    src, tensors = source
    out = tmp_path / "out.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = FTYPE[qtype], True, 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) == 0
    qt = quant_type(qtype)
    same = total = 0
    for t in gguf.GGUFReader(out).tensors:
        assert t.tensor_type == qtype, t.name
        ref = np.asarray(t.data).view(np.uint8).reshape(-1, qt.type_size)
        ours = qt.quantize(tensors[t.name]).reshape(-1, qt.type_size)
        eq = (ours == ref).all(axis=1)
        same, total = same + int(eq.sum()), total + eq.size
        assert eq.all(), f"{t.name}: first differing block {np.flatnonzero(~eq)[0]}"
    print(f"{qtype.name}: {same}/{total} blocks identical ({same / total:.4%})")


@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda q: q.name)
def test_float_conversion_special_values(qtype):
    """NaN payloads/signs, infinities, overflow, subnormals and random bit patterns: exact bits."""
    rng = np.random.default_rng(7)
    bits = np.concatenate([rng.integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32),
                           np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0xFF812345,
                                     0x7FFFFFFF, 0x477FF000, 0x477FEFFF, 0x00000001, 0x80000000, 0x33000000,
                                     0x33000001, 0x387FC000, 0x3F808000, 0x3F818000] * 2, np.uint32)])
    x = bits.view(np.float32).reshape(-1, 32)
    np.testing.assert_array_equal(quant_type(qtype).quantize(x), ggml_quantize(qtype, x))  # exact


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda q: q.name)
def test_block_quantizers_extreme_magnitudes(qtype):
    """Scales that overflow or underflow fp16 (llama.cpp's validation rejects the former, but
    the bytes must still agree) and the float32 extremes."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-44, 38, (64, 1)).astype(np.float32)
    x[0, :4] = [3.4e38, -3.4e38, 1e-45, 0]
    np.testing.assert_array_equal(quant_type(qtype).quantize(x), ggml_quantize(qtype, x))  # exact


@settings(max_examples=150, deadline=None)
@given(qtype=st.sampled_from([T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.F16, T.BF16]),
       x=arrays(np.float32, (2, 64), elements=st.floats(-1e5, 1e5, width=32, allow_subnormal=True)))
def test_any_finite_rows_match_ggml(qtype, x):
    """Property: for any finite input (hypothesis favours repeats, ties and boundaries) the bytes equal ggml's."""
    np.testing.assert_array_equal(quant_type(qtype).quantize(x), ggml_quantize(qtype, x))  # exact


def test_quantize_checks_shape():
    with pytest.raises(ValueError, match="n_cols % 32"):
        quant_type(T.Q8_0).quantize(np.zeros((2, 48), np.float32))

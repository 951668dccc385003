"""Q3_K/Q4_K/Q5_K/Q6_K quantizers against llama.cpp, byte for byte.

Oracles as in test_quantize_legacy: llama_model_quantize (params.pure, so every
2-D weight gets the type under test) on a small F32 GGUF, and
ggml_quantize_chunk through ctypes for arbitrary rows.
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

FTYPE = {T.Q3_K: llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M, T.Q4_K: llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
         T.Q5_K: llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M, T.Q6_K: llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K}
KQUANTS = list(FTYPE)


def _kquant_rows(rng, kind: str) -> np.ndarray:
    """f32[16, 1024] data aimed at the K-quant scale searches (4 super-blocks per row)."""
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    if kind == "subblock_mix":
        # sub-blocks of 16 spanning 1e-8..1e3 in one super-block: scales that quantize to 0
        # (d == 0 keeps the search's quants), clamp at the top, fp16-subnormal d; some all zero
        x *= np.float32(10.0) ** rng.integers(-8, 4, (16, 64)).repeat(16, axis=1).astype(np.float32)
        x[:, 16 * rng.integers(0, 64, 8)] = 0
        x[::3, 256:512] = 0
        return x
    if kind == "positive":  # min > 0 is clamped to 0 in make_qkx2_quants; one-sided maxima
        return np.abs(x) + np.float32(0.5)
    if kind == "small_grid":
        # few distinct values on a coarse grid: many candidate scales fit equally well
        # (ties in make_qkx2_quants' error, make_q3_quants' sum comparisons, nearest_int halves)
        return (rng.integers(-4, 5, x.shape) * np.float32(0.25)).astype(np.float32)
    raise ValueError(kind)


K_KINDS = ["subblock_mix", "positive", "small_grid"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    rng = np.random.default_rng(4321)
    tensors = {f"blk.{i}.ffn_up.weight": float_rows(rng, k) for i, k in enumerate(FLOAT_KINDS)}
    tensors.update({f"blk.{len(FLOAT_KINDS) + i}.ffn_up.weight": _kquant_rows(rng, k) for i, k in enumerate(K_KINDS)})
    path = tmp_path_factory.mktemp("kquants") / "f32.gguf"
    write_f32_model(path, tensors)
    return path, tensors


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_same_bytes_as_llama_model_quantize(source, tmp_path, qtype):
    src, tensors = source
    out = tmp_path / "out.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = FTYPE[qtype], True, 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) == 0
    qt = quant_type(qtype)
    same = total = 0
    names = set()
    for t in gguf.GGUFReader(out).tensors:
        assert t.tensor_type == qtype, t.name
        names.add(t.name)
        ref = np.asarray(t.data).view(np.uint8).reshape(-1, qt.type_size)
        ours = qt.quantize(tensors[t.name]).reshape(-1, qt.type_size)
        eq = (ours == ref).all(axis=1)
        same, total = same + int(eq.sum()), total + eq.size
        assert eq.all(), f"{t.name}: first differing block {np.flatnonzero(~eq)[0]}"  # exact bytes
    assert names == set(tensors)
    print(f"{qtype.name}: {same}/{total} blocks identical ({same / total:.4%})")


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_extreme_magnitudes_match_ggml(qtype):
    """Rows scaled from 1e-44 to 1e30 (fp16 scales that underflow or overflow, sums that
    reach inf) and float32 extremes: the bytes still agree."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((48, 512)).astype(np.float32)
    x *= np.float32(10.0) ** np.linspace(-44, 30, 48).round()[:, None].astype(np.float32)
    x[0, :4] = [3.4e38, -3.4e38, 1e-45, 0]
    np.testing.assert_array_equal(quant_type(qtype).quantize(x), ggml_quantize(qtype, x))  # exact


@settings(max_examples=100, deadline=None)
@given(qtype=st.sampled_from(KQUANTS),
       x=arrays(np.float32, (2, 256), elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=True)))
def test_any_finite_rows_match_ggml(qtype, x):
    """Property: for any finite input (hypothesis favours repeats, ties and boundaries) the bytes equal ggml's."""
    np.testing.assert_array_equal(quant_type(qtype).quantize(x), ggml_quantize(qtype, x))  # exact


def test_quantize_checks_shape():
    with pytest.raises(ValueError, match="n_cols % 256"):
        quant_type(T.Q4_K).quantize(np.zeros((2, 128), np.float32))

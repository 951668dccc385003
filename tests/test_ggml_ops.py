"""The element-wise ops of the MoE FFN and router, bit-exact against ggml's CPU ops.

llama.cpp's silu/swiglu and soft_max use ggml_v_expf (a polynomial, not libm expf) on 16-wide
chunks. A last-bit difference there flips the rounding of the next Q8_0 activation now and then,
and greedy decodes part (benchmarks/parting.py). ggml is called through ctypes on
llama-cpp-python's libggml, in a plain context computed by ggml_graph_compute_with_ctx."""
import ctypes

import numpy as np
import pytest

from benchmarks._common import InitParams, ggml_lib
from localmoe.arch.base import route_topk, router_logits
from localmoe.layers import sigmoid, silu, softmax
from localmoe.weights import Linear

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def ggml():
    return ggml_lib()


def run_op(g, op: str, *arrays: np.ndarray) -> np.ndarray:
    """ggml `op` of f32[rows, n] inputs (ggml ne = (n, rows)), computed on 2 threads."""
    ctx = g["ggml_init"](InitParams(64 << 20, None, False))
    try:
        ts = []
        for a in arrays:
            t = g["ggml_new_tensor_2d"](ctx, 0, a.shape[1], a.shape[0])  # GGML_TYPE_F32
            ctypes.memmove(g["ggml_get_data"](t), np.ascontiguousarray(a, np.float32).ctypes.data, a.nbytes)
            ts.append(t)
        out = g[op](ctx, *ts)
        graph = g["ggml_new_graph"](ctx)
        g["ggml_build_forward_expand"](graph, out)
        assert g["ggml_graph_compute_with_ctx"](ctx, graph, 2) == 0
        n_out = {"ggml_sum_rows": 1, "ggml_mul_mat": arrays[0].shape[0]}.get(op, arrays[0].shape[1])
        y = np.empty((arrays[-1].shape[0], n_out), np.float32)
        ctypes.memmove(y.ctypes.data, g["ggml_get_data"](out), y.nbytes)
        return y
    finally:
        g["ggml_free"](ctx)


def _wide(rng, rows, n):
    """Values across the ranges an FFN sees, plus the edges of ggml_v_expf (|x| > 88 overflows
    expf, |n| > 126 and > 192 switch its paths) and signed zeros."""
    x = (rng.standard_normal((rows, n)) * np.float32(3)).astype(np.float32)
    edges = np.array([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 87.5, -87.5, 89.0, -89.0, 104.0, -104.0,
                      130.0, -130.0, 200.0, -200.0], np.float32)
    x.reshape(-1)[:edges.size] = edges
    return x


@pytest.mark.parametrize("n", [16, 80, 83, 512, 7])   # whole 16-wide chunks, chunks + a tail, tail only
def test_silu_bit_exact(ggml, n):
    x = _wide(np.random.default_rng(n), 64, n)
    ref = run_op(ggml, "ggml_silu", x)
    assert np.array_equal(silu(x).view(np.uint32), ref.view(np.uint32)), "silu differs from ggml_silu (tol: 0 ulp)"


@pytest.mark.parametrize("n", [1, 64, 256])         # qwen2moe's shared-expert gate, DeepSeek-V3's router
def test_sigmoid_bit_exact(ggml, n):
    x = _wide(np.random.default_rng(n), 64, n) if n >= 16 else np.linspace(-30, 30, 64, dtype=np.float32)[:, None]
    ref = run_op(ggml, "ggml_sigmoid", x)
    assert np.array_equal(sigmoid(x).view(np.uint32), ref.view(np.uint32)), "sigmoid vs ggml_sigmoid (tol: 0 ulp)"


def test_swiglu_bit_exact(ggml):
    rng = np.random.default_rng(1)
    g, u = _wide(rng, 32, 512), (rng.standard_normal((32, 512)) * 2).astype(np.float32)
    ref = run_op(ggml, "ggml_swiglu_split", g, u)
    assert np.array_equal((silu(g) * u).view(np.uint32), ref.view(np.uint32)), "silu(g) * u vs ggml_swiglu_split (tol: 0 ulp)"


@pytest.mark.parametrize("n", [8, 60, 64, 128])      # Mixtral/OLMoE/DeepSeek/Qwen3 expert counts
def test_router_softmax_bit_exact(ggml, n):
    logits = (np.random.default_rng(n).standard_normal((64, n)) * 4).astype(np.float32)
    ref = run_op(ggml, "ggml_soft_max", logits)
    assert np.array_equal(softmax(logits).view(np.uint32), ref.view(np.uint32)), "softmax vs ggml_soft_max (tol: 0 ulp)"


@pytest.mark.parametrize("k", [2, 3, 6, 8])
def test_weight_renormalisation_bit_exact(ggml, k):
    """build_moe_ffn's norm_w: weights / clamp(sum_rows(weights)); sum_rows adds in float64."""
    logits = (np.random.default_rng(k).standard_normal((256, 64)) * 4).astype(np.float32)
    ids, w = route_topk(logits, k, "softmax", norm=True, scale=1.0)
    picked = np.take_along_axis(softmax(logits), ids, axis=-1)
    ref = picked / np.maximum(run_op(ggml, "ggml_sum_rows", picked), np.float32(6.103515625e-5))
    assert np.array_equal(w.view(np.uint32), ref.view(np.uint32)), "normalised weights (tol: 0 ulp)"


@pytest.mark.parametrize("n_expert,n_embd", [(8, 256), (64, 2048), (128, 256), (6, 256), (8, 40)])
@pytest.mark.parametrize("n_tok", [1, 2, 16])
def test_f32_router_logits_bit_exact(ggml, n_expert, n_embd, n_tok):
    """F32 router logits: ggml_mul_mat of f32 by f32: ggml_vec_dot_f32 for one token, llamafile
    sgemm for a batch whose shape it takes (n_expert % 4 == 0, n_embd % 16 == 0), else vec_dot."""
    rng = np.random.default_rng(n_expert)
    w = (rng.standard_normal((n_expert, n_embd)) * 0.05).astype(np.float32)
    x = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    ref = run_op(ggml, "ggml_mul_mat", w, x)
    ours = router_logits(Linear("ffn_gate_inp", 0, w.shape, w), x)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), "router logits vs ggml_mul_mat (tol: 0 ulp)"


def test_q8_k_activation_bit_exact(ggml):
    """x -> Q8_K (d, qs, bsums), what the K-quant matvecs dot with, against ggml's quantize_row_q8_K:
    ties of |x| with either sign first, zero and -0 blocks, NaN and inf, tiny and huge scales."""
    from localmoe.quant.common import quantize_q8_k
    rng = np.random.default_rng(11)
    n = 256 * 12
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 30, n // 256).repeat(256)).astype(np.float32)
    blocks = x.reshape(-1, 256)
    blocks[0, [3, 7, 200]] = [-5.0, 5.0, 5.0]  # the first of the largest |x| sets the sign of d
    blocks[0][np.abs(blocks[0]) > 5] = 1.0
    blocks[1] = 0.0
    blocks[2] = -0.0
    blocks[3, 9], blocks[4, 17], blocks[5, 100] = np.nan, np.inf, -np.inf
    blocks[6] = rng.integers(-3, 4, 256)  # many ties
    qs, d, bsums = np.empty(n, np.int8), np.empty(n // 256, np.float32), np.empty(n // 16, np.int32)
    with np.errstate(all="ignore"):
        quantize_q8_k(x, qs, d, bsums)
    ref = np.zeros(n // 256, np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)]))
    ggml["quantize_row_q8_K"](x.ctypes.data, ref.ctypes.data, n)
    np.testing.assert_array_equal(d.view(np.uint32), ref["d"].view(np.uint32), err_msg="d (bits)")
    np.testing.assert_array_equal(qs.reshape(-1, 256), ref["qs"], err_msg="qs")
    live = ref["d"] != 0  # ggml leaves an all-zero block's bsums unwritten
    np.testing.assert_array_equal(bsums.reshape(-1, 16)[live], ref["bsums"][live], err_msg="bsums")

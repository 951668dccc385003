"""Routing and expert compute on hand-made weights whose answer is known.

Expert e has gate = up = I and down = D[e] * I, so it maps x to D[e] * silu(x) * x:
the MoE output divided by silu(x) * x is sum_s w_s * D[e_s], which tells which
experts ran and with which weights. The router reads coordinate e of x for expert e
(W_router = I), so the logits are x itself and the top-k are known in advance.
"""
from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from localmoe.arch import arch_module
from localmoe.experts import ExpertStore
from localmoe.layers import Rope
from localmoe.moe import moe_ffn
from localmoe.weights import Linear

N = 8          # n_embd = n_expert = n_ff
K = 2
D = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0], np.float32)  # expert e scales by D[e]


def linear(name, a):
    a = np.ascontiguousarray(a, np.float32)
    return Linear(name, T.F32, a.shape, a.view(np.uint8))


def expert_block(shared_gate=None, dense=False):
    eye = np.eye(N, dtype=np.float32)
    w = SimpleNamespace(
        ffn_gate_inp=linear("ffn_gate_inp", eye),
        ffn_gate_exps=linear("ffn_gate_exps", np.stack([eye] * N)),
        ffn_up_exps=linear("ffn_up_exps", np.stack([eye] * N)),
        ffn_down_exps=linear("ffn_down_exps", np.stack([d * eye for d in D])),
        # shared expert / dense FFN: 3 * silu(x) * x
        ffn_gate_shexp=linear("g", eye), ffn_up_shexp=linear("u", eye), ffn_down_shexp=linear("d", 3 * eye),
        ffn_gate=linear("g", eye), ffn_up=linear("u", eye), ffn_down=linear("d", 3 * eye),
    )
    if shared_gate is not None:
        w.ffn_gate_inp_shexp = linear("ffn_gate_inp_shexp", shared_gate[None, :])
    return w


def make(arch, scale=0.0, dense_lead=0, w=None):
    mod = arch_module(arch)
    extra = {"n_layer_dense_lead": dense_lead} if arch == "deepseek" else {}
    args = mod.ModelArgs(arch=arch, n_vocab=1, n_embd=N, n_layer=1, n_head=1, n_head_kv=1, head_dim_k=N,
                         head_dim_v=N, n_ctx_train=8, norm_eps=1e-6, kq_scale=1.0,
                         rope=Rope(n_rot=N, neox=False), n_expert=N, n_expert_used=K,
                         expert_weights_scale=scale, **extra)
    w = w or expert_block()
    for name in mod.Block.required:  # attention tensors: not used by ffn()
        if not hasattr(w, name):
            setattr(w, name, None)
    store = ExpertStore.from_blocks([w], N)
    return mod.Block(args, w, 0, store), store


X = np.array([[0.3, 2.0, -1.0, 1.5, 0.1, -0.5, 0.7, 0.2],     # top-2: experts 1, 3
              [1.2, -0.3, 0.4, 0.0, 2.5, 0.9, -2.0, 0.6]],    # top-2: experts 4, 0
             np.float32)
TOP = np.array([[1, 3], [4, 0]])


def silu_x(x):
    x = x.astype(np.float64)
    return x / (1 + np.exp(-x)) * x


def expected_weights(x, norm, scale=1.0):
    p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    top = np.argsort(-x)[:K]
    w = p[top] / p[top].sum() if norm else p[top]
    return top, w * scale


@pytest.mark.parametrize("arch,norm,scale", [
    ("qwen3moe", True, 0.0),   # softmax, top-k renormalised
    ("llama", True, 0.0),      # Mixtral: same
    ("olmoe", False, 0.0),     # softmax over all experts, not renormalised
    ("deepseek", False, 2.5),  # not renormalised, times expert_weights_scale
])
def test_softmax_topk_routing(arch, norm, scale):
    blk, store = make(arch, scale=scale)
    out = blk.ffn(X)
    for t in range(len(X)):
        top, w = expected_weights(X[t].astype(np.float64), norm, scale or 1.0)
        assert list(top) == list(TOP[t])
        want = (w * D[top]).sum() * silu_x(X[t])
        if arch == "deepseek":
            want += 3 * silu_x(X[t])   # ungated shared experts
        np.testing.assert_allclose(out[t], want, rtol=1e-5, atol=1e-6, err_msg=f"{arch} token {t} (rtol 1e-5)")
    # only the routed experts ran, once per routed token
    want_counts = np.zeros(N, int)
    np.add.at(want_counts, TOP.reshape(-1), 1)
    assert store.counts[0].tolist() == want_counts.tolist()


def test_qwen2moe_shared_expert_gated_by_sigmoid():
    g = np.linspace(-1, 1, N).astype(np.float32)
    blk, _ = make("qwen2moe", w=expert_block(shared_gate=g))
    out = blk.ffn(X)
    for t in range(len(X)):
        top, w = expected_weights(X[t].astype(np.float64), norm=False)
        gate = 1 / (1 + np.exp(-(g.astype(np.float64) @ X[t])))
        want = ((w * D[top]).sum() + gate * 3) * silu_x(X[t])
        np.testing.assert_allclose(out[t], want, rtol=1e-5, atol=1e-6, err_msg=f"token {t} (rtol 1e-5)")


def test_deepseek_leading_dense_layer_skips_the_router():
    blk, store = make("deepseek", dense_lead=1)
    np.testing.assert_allclose(blk.ffn(X), 3 * silu_x(X), rtol=1e-5, atol=1e-6, err_msg="rtol 1e-5")
    assert store.counts.sum() == 0


def test_n_expert_used_override_changes_k():
    blk, store = make("qwen3moe")
    blk.args = type(blk.args)(**{**vars(blk.args), "n_expert_used": 3})
    blk.ffn(X[:1])
    assert store.counts[0].sum() == 3


class SpyStore(ExpertStore):
    """Records which (expert, matrix) pairs the compute asked for."""

    def __init__(self, *a):
        super().__init__(*a)
        self.asked = []

    def expert(self, layer, name, e):
        self.asked.append((int(e), name))
        return super().expert(layer, name, e)


def test_batch_reads_each_selected_expert_once_and_equals_token_by_token():
    rng = np.random.default_rng(0)
    w = expert_block()
    store = SpyStore({(0, n): getattr(w, n) for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}, 1, N)
    x = rng.standard_normal((6, N)).astype(np.float32)
    ids = np.argsort(-x, axis=1)[:, :K].astype(np.int32)
    wts = rng.random((6, K)).astype(np.float32)
    batch = moe_ffn(store, 0, x, ids, wts)
    asked = sorted(store.asked)
    assert asked == sorted((int(e), n) for e in np.unique(ids)
                           for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
    single = np.concatenate([moe_ffn(store, 0, x[t:t + 1], ids[t:t + 1], wts[t:t + 1]) for t in range(6)])
    np.testing.assert_allclose(batch, single, rtol=1e-6, atol=1e-7, err_msg="rtol 1e-6")
    want = np.stack([sum(wts[t, s] * D[ids[t, s]] for s in range(K)) * silu_x(x[t]) for t in range(6)])
    np.testing.assert_allclose(batch, want, rtol=1e-5, atol=1e-6, err_msg="rtol 1e-5")

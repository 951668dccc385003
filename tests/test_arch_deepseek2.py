"""deepseek2 (DeepSeek-V2 / V2-Lite / V3) vs llama.cpp on tiny random models, F16
and llama.cpp-quantized files, in both attention forms: split attn_k_b/attn_v_b
(MLA, latent cache) and the legacy single attn_kv_b (`-kvb` variants, MHA)."""
from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import localmoe
from localmoe.arch import deepseek2
from localmoe.experts import ExpertStore
from localmoe.gguf_file import open_gguf
from localmoe.layers import Rope
from localmoe.weights import Linear
from reference import check_greedy, check_logits, model_file, nmse

VARIANTS = ["v2-lite", "v2", "v3", "v2-lite-kvb", "v2-kvb", "v3-kvb"]


@pytest.mark.reference
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_llama_cpp(variant, ftype):
    check_logits("deepseek2", ftype, variant=variant)


@pytest.mark.reference
@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_llama_cpp(variant, ftype):
    check_greedy("deepseek2", ftype, variant=variant)


def test_cache_layout_follows_the_attention_form():
    """MLA files cache kv_lora_rank + n_rot values per token (V is a view of K);
    legacy kv_b files cache decompressed K and V for every head, like llama.cpp."""
    mla = localmoe.load(model_file("deepseek2", variant="v3"), n_ctx=8)
    a = mla.args
    assert mla.cache.k.shape[1:] == (8, 1, a.kv_lora_rank + a.n_rot) and mla.cache.v.size == 0
    mha = localmoe.load(model_file("deepseek2", variant="v3-kvb"), n_ctx=8)
    b = mha.args
    assert mha.cache.k.shape[1:] == (8, b.n_head, b.head_dim_qk)
    assert mha.cache.v.shape[1:] == (8, b.n_head, b.head_dim_v_mla)


def test_chunked_decode_equals_one_batch_with_latent_cache():
    model = localmoe.load(model_file("deepseek2", variant="v2"), n_ctx=16)
    toks = list(range(200, 210))
    whole = model.eval(toks)
    model.reset()
    parts = np.concatenate([model.forward(toks[:4]), model.forward(toks[4:5]), model.forward(toks[5:])])
    e = nmse(parts, whole)
    assert e <= 1e-8, f"NMSE {e:.3g} > 1e-8"


# --- routing with a known router (sigmoid + selection bias + group-limited top-k) ---

N, K = 8, 2            # experts (4 groups of 2), experts per token
D = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0], np.float32)   # expert e scales by D[e]
BIAS = np.array([0, 0, 0, 0, 0.5, 0, 0, 0], np.float32)                  # exp_probs_b: favours expert 4
SCALE = 2.5
# the router is the identity, so these rows are the router logits
X = np.array([
    # sigmoid: .953 .047 | .731 .711 | .018 .599 | .550 .525 -> group sums 1.00, 1.44, 1.12, 1.07:
    # groups 1 and 2 win, so expert 0 (the best single score) is masked out; picks 2, 3
    [3.0, -3.0, 1.0, 0.9, -4.0, 0.4, 0.2, 0.1],
    # sigmoid: .119 .047 | .269 .047 | .182 .646 | .599 .047; unbiased the top-2 would be 5, 6,
    # but expert 4's bias lifts group 2 (1.33) and expert 4 (.682) over 6 (.599): picks 4, 5
    [-2.0, -3.0, -1.0, -3.0, -1.5, 0.6, 0.4, -3.0],
], np.float32)
PICKS = [[2, 3], [4, 5]]


def linear(name, a):
    a = np.ascontiguousarray(a, np.float32)
    return Linear(name, T.F32, a.shape, a.view(np.uint8))


def routed_block(bias):
    eye = np.eye(N, dtype=np.float32)
    w = SimpleNamespace(
        ffn_gate_inp=linear("ffn_gate_inp", eye),
        ffn_gate_exps=linear("ffn_gate_exps", np.stack([eye] * N)),
        ffn_up_exps=linear("ffn_up_exps", np.stack([eye] * N)),
        ffn_down_exps=linear("ffn_down_exps", np.stack([d * eye for d in D])),
        ffn_gate_shexp=linear("g", eye), ffn_up_shexp=linear("u", eye), ffn_down_shexp=linear("d", 3 * eye),
        # attention is not exercised here; the block only checks these exist
        attn_norm=None, ffn_norm=None, attn_kv_a_mqa=None, attn_kv_a_norm=None, attn_output=None,
        attn_kv_b=None, attn_q=None,
    )
    if bias is not None:
        w.exp_probs_b = bias
    args = deepseek2.ModelArgs(
        arch="deepseek2", n_vocab=1, n_embd=N, n_layer=1, n_head=1, n_head_kv=1, head_dim_k=N, head_dim_v=N,
        n_ctx_train=8, norm_eps=1e-6, kq_scale=1.0, rope=Rope(n_rot=2, neox=False), n_expert=N,
        n_expert_used=K, expert_weights_scale=SCALE, mla=False, gating="sigmoid",
        expert_weights_norm=True, n_group=4, n_group_used=2)
    store = ExpertStore.from_blocks([w], N)
    return deepseek2.Block(args, w, 0, store), store


def silu_x(x):
    x = x.astype(np.float64)
    return x / (1 + np.exp(-x)) * x


def test_sigmoid_bias_group_routing_picks_and_weights():
    blk, store = routed_block(BIAS)
    out = blk.ffn(X)
    for t, picks in enumerate(PICKS):
        p = 1 / (1 + np.exp(-X[t].astype(np.float64)))     # unbiased gate: the bias never reaches the weights
        w = p[picks] / p[picks].sum() * SCALE
        want = ((w * D[picks]).sum() + 3) * silu_x(X[t])    # + ungated shared expert
        np.testing.assert_allclose(out[t], want, rtol=1e-5, atol=1e-6, err_msg=f"token {t} (rtol 1e-5)")
    want_counts = np.zeros(N, int)
    np.add.at(want_counts, np.array(PICKS).reshape(-1), 1)
    assert store.counts[0].tolist() == want_counts.tolist()


def test_without_bias_the_second_token_keeps_its_unbiased_picks():
    blk, store = routed_block(None)
    blk.ffn(X[1:])
    assert np.flatnonzero(store.counts[0]).tolist() == [5, 6]


# --- user errors -------------------------------------------------------------

def test_tensors_of_the_other_attention_form_are_a_clear_error():
    blk, _ = routed_block(None)
    w = vars(blk.w).copy()
    del w["attn_kv_b"]
    with pytest.raises(localmoe.LocalMoEError, match=r"legacy MHA .* blk\.0\.attn_kv_b\.weight"):
        deepseek2.Block(blk.args, SimpleNamespace(**w), 0, None)


def test_unknown_gating_function_is_unsupported():
    class File:   # the metadata of the tiny v3 file with one key changed
        def __init__(self, path, **override):
            self._g = open_gguf(path)
            self.arch, self.tensors, self._o = self._g.arch, self._g.tensors, override

        def arch_get(self, key, default=None):
            return self._o[key] if key in self._o else self._g.arch_get(key, default)

    f = File(model_file("deepseek2", variant="v3"), expert_gating_func=4)
    with pytest.raises(localmoe.LocalMoEError, match="expert_gating_func=4 is not supported"):
        deepseek2.ModelArgs.from_gguf(f)

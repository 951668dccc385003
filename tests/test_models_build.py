"""models.build: random-weight GGUFs with the keys, tensors and shapes llama.cpp loads.

Expected shapes below are written out from llama.cpp's load_arch_tensors
formulas with the tiny hyperparameters (numpy order = ggml ne reversed), not
read back from models.archs.
"""
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from localmoe.errors import LocalMoEError
from localmoe.gguf_file import open_gguf
from models import archs
from models.build import build, cached_model, main
from models.vocab import vocab_path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [(a, v) for a in archs.ARCHS for v in archs.variants(a)]
# one of each distinct tiny model (8x22b / 235b tiny equal 8x7b / 30b tiny)
MODELS = [("llama", None), ("qwen2moe", None), ("qwen3moe", None), ("olmoe", None), ("deepseek", None),
          ("deepseek2", "v2-lite"), ("deepseek2", "v2"), ("deepseek2", "v3"),
          ("deepseek2", "v2-lite-kvb"), ("deepseek2", "v3-kvb")]
NV = {"llama-spm": 32000, "qwen2": 151936, "gpt-2": 50257, "deepseek-llm": 102400}

# {(arch, variant): ({key: value}, {tensor: numpy shape or None for "absent"})}
EXPECT = {
    ("llama", None): (
        {"llama.expert_count": 8, "llama.expert_used_count": 2, "llama.rope.dimension_count": 64,
         "llama.vocab_size": 32000, "llama.block_count": 2},
        {"token_embd.weight": (32000, 256), "output.weight": (32000, 256),
         "blk.1.attn_q.weight": (256, 256), "blk.1.attn_k.weight": (128, 256),
         "blk.1.ffn_gate_inp.weight": (8, 256), "blk.1.ffn_gate_exps.weight": (8, 256, 256),
         "blk.1.ffn_down_exps.weight": (8, 256, 256), "blk.2.attn_q.weight": None}),
    ("qwen2moe", None): (
        {"qwen2moe.expert_feed_forward_length": 256, "qwen2moe.expert_shared_feed_forward_length": 512},
        {"token_embd.weight": (151936, 256), "blk.0.attn_q.bias": (256,), "blk.0.attn_v.bias": (256,),
         "blk.0.ffn_gate_inp_shexp.weight": (256,), "blk.0.ffn_up_shexp.weight": (512, 256),
         "blk.0.ffn_down_shexp.weight": (256, 512), "blk.0.ffn_up_exps.weight": (8, 256, 256)}),
    ("qwen3moe", None): (
        {"qwen3moe.attention.key_length": 128, "qwen3moe.attention.head_count": 4,
         "qwen3moe.attention.head_count_kv": 2, "qwen3moe.expert_used_count": 4},
        {"blk.0.attn_q.weight": (512, 256), "blk.0.attn_k.weight": (256, 256),
         "blk.0.attn_output.weight": (256, 512), "blk.0.attn_q_norm.weight": (128,),
         "blk.0.attn_k_norm.weight": (128,), "blk.1.ffn_gate_exps.weight": (16, 256, 256),
         "blk.0.attn_q.bias": None}),
    ("olmoe", None): (
        {"tokenizer.ggml.pre": "olmo", "olmoe.expert_count": 16},
        {"token_embd.weight": (50257, 256), "blk.0.attn_q_norm.weight": (256,),
         "blk.0.attn_k_norm.weight": (256,), "blk.0.ffn_down_exps.weight": (16, 256, 256)}),
    ("deepseek", None): (
        {"deepseek.leading_dense_block_count": 1, "deepseek.expert_shared_count": 2,
         "deepseek.expert_weights_scale": 1.0},
        {"blk.0.ffn_gate.weight": (512, 256), "blk.0.ffn_gate_inp.weight": None,
         "blk.1.ffn_gate_inp.weight": (16, 256), "blk.1.ffn_up_shexp.weight": (512, 256),
         "blk.2.ffn_down_shexp.weight": (256, 512), "token_embd.weight": (102400, 256)}),
    ("deepseek2", "v2-lite"): (
        {"deepseek2.attention.q_lora_rank": 0, "deepseek2.attention.kv_lora_rank": 256,
         "deepseek2.attention.key_length_mla": 192, "deepseek2.attention.value_length_mla": 128,
         "deepseek2.attention.key_length": 320, "deepseek2.attention.head_count_kv": 1,
         "deepseek2.rope.dimension_count": 64, "deepseek2.rope.scaling.type": "yarn",
         "deepseek2.expert_gating_func": 1},
        {"blk.0.attn_q.weight": (768, 256), "blk.0.attn_q_a.weight": None,
         "blk.0.attn_kv_a_mqa.weight": (320, 256), "blk.0.attn_kv_a_norm.weight": (256,),
         "blk.0.attn_k_b.weight": (4, 256, 128), "blk.0.attn_v_b.weight": (4, 128, 256),
         "blk.0.attn_kv_b.weight": None, "blk.0.attn_output.weight": (256, 512),
         "blk.1.exp_probs_b.bias": None}),
    ("deepseek2", "v2"): (
        {"deepseek2.attention.q_lora_rank": 256, "deepseek2.expert_group_count": 4,
         "deepseek2.expert_group_used_count": 2, "deepseek2.expert_weights_scale": 16.0},
        {"blk.0.attn_q_a.weight": (256, 256), "blk.0.attn_q_a_norm.weight": (256,),
         "blk.0.attn_q_b.weight": (768, 256), "blk.0.attn_q.weight": None}),
    ("deepseek2", "v3"): (
        {"deepseek2.expert_gating_func": 2, "deepseek2.expert_weights_norm": True,
         "deepseek2.expert_weights_scale": 2.5, "deepseek2.expert_shared_count": 1},
        {"blk.0.exp_probs_b.bias": None, "blk.1.exp_probs_b.bias": (16,),
         "blk.2.ffn_up_shexp.weight": (256, 256)}),
    ("deepseek2", "v2-lite-kvb"): (
        {"deepseek2.attention.key_length": 192, "deepseek2.attention.value_length": 128,
         "deepseek2.attention.head_count_kv": 4},
        {"blk.0.attn_kv_b.weight": (1024, 256), "blk.0.attn_k_b.weight": None}),
    ("deepseek2", "v3-kvb"): ({}, {"blk.2.attn_kv_b.weight": (1024, 256), "blk.2.exp_probs_b.bias": (16,)}),
}


def tiny(arch, variant):
    return cached_model(arch, "tiny", variant=variant)


def _f32(g, name):
    t = g.tensor(name)
    return gguf.quants.dequantize(np.array(t.data), t.qtype).reshape(t.shape)


@pytest.mark.parametrize("arch,variant", VARIANTS)
def test_tiny_builds_with_expected_layout(arch, variant):
    keys, shapes = EXPECT.get((arch, variant)) or EXPECT.get((arch, None)) or ({}, {})
    with open_gguf(tiny(arch, variant)) as g:
        assert g.arch == arch
        for k, v in keys.items():
            assert g.metadata[k] == v, k
        for name, shape in shapes.items():
            if shape is None:
                assert name not in g.tensors
            else:
                assert g.tensor(name).shape == shape, name
        n_vocab = len(g.metadata["tokenizer.ggml.tokens"])
        assert n_vocab == NV[archs.VOCAB[arch]]
        assert g.tensor("token_embd.weight").shape == (n_vocab, g.arch_get("embedding_length"))
        for t in g.tensors.values():
            small = len(t.shape) == 1 or t.name.endswith("_norm.weight") or ".ffn_gate_inp" in t.name \
                or t.name.endswith(".bias")
            assert t.qtype == (T.F32 if small else T.F16), t.name


@pytest.mark.parametrize("arch,variant", MODELS)
def test_tokenizer_keys_copied_exactly(arch, variant):
    with open_gguf(vocab_path(archs.VOCAB[arch])) as v, open_gguf(tiny(arch, variant)) as g:
        tok = [k for k in v.metadata if k.startswith("tokenizer.")]
        assert tok, "vocab file has no tokenizer keys"
        for k in tok:
            assert g.metadata.value_type(k) == v.metadata.value_type(k), k
            if k != "tokenizer.ggml.pre" or arch != "olmoe":
                assert g.metadata[k] == v.metadata[k], k


def test_gguf_reader_parses_and_agrees():
    """gguf-py's own reader (independent of localmoe.gguf_file) on the smallest-vocab model."""
    path = tiny("llama", None)
    r = gguf.GGUFReader(path)
    voc = gguf.GGUFReader(vocab_path("llama-spm"))
    assert r.fields["general.architecture"].contents() == "llama"
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert r.fields[k].types == voc.fields[k].types, k
        assert r.fields[k].contents() == voc.fields[k].contents(), k
    t = {x.name: x for x in r.tensors}
    assert list(t["blk.0.ffn_up_exps.weight"].shape) == [256, 256, 8]   # ggml ne order
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type == T.F32


@pytest.mark.parametrize("arch,variant", MODELS)
def test_router_picks_most_experts(arch, variant):
    """Layer router on rms-normed embeddings of 512 random tokens: top-k covers >= 75% of experts."""
    with open_gguf(tiny(arch, variant)) as g:
        n_used = g.arch_get("expert_used_count")
        layer = g.arch_get("leading_dense_block_count", 0)
        w = _f32(g, f"blk.{layer}.ffn_gate_inp.weight")
        emb = _f32(g, "token_embd.weight")
        x = emb[np.random.default_rng(1).choice(len(emb), 512, replace=False)]
        x = x / np.sqrt((x * x).mean(1, keepdims=True)) * _f32(g, f"blk.{layer}.ffn_norm.weight")
        top = np.argsort(-(x @ w.T), axis=1)[:, :n_used]
        assert len(np.unique(top)) >= 0.75 * len(w), (len(np.unique(top)), len(w))


def test_split_mla_equals_fused():
    """Same seed: attn_k_b/attn_v_b are attn_kv_b split per head as convert_hf_to_gguf does (exact)."""
    with open_gguf(tiny("deepseek2", "v2-lite")) as s, open_gguf(tiny("deepseek2", "v2-lite-kvb")) as f:
        kv_b = _f32(f, "blk.1.attn_kv_b.weight").reshape(4, 128 + 128, 256)   # (head, nope+v, kv_lora)
        np.testing.assert_array_equal(_f32(s, "blk.1.attn_k_b.weight"), kv_b[:, :128].transpose(0, 2, 1))
        np.testing.assert_array_equal(_f32(s, "blk.1.attn_v_b.weight"), kv_b[:, 128:])
        np.testing.assert_array_equal(_f32(s, "blk.1.ffn_up_exps.weight"), _f32(f, "blk.1.ffn_up_exps.weight"))


def test_seed_and_dtypes(tmp_path):
    a = build("llama", out=tmp_path / "a.gguf", dtype="f32", seed=3)
    b = build("llama", out=tmp_path / "b.gguf", dtype="bf16", seed=3)
    c = build("llama", out=tmp_path / "c.gguf", dtype="f32", seed=4)
    assert a.read_bytes() == build("llama", out=tmp_path / "a2.gguf", dtype="f32", seed=3).read_bytes()
    assert not list(tmp_path.glob("*.partial"))
    with open_gguf(a) as fa, open_gguf(b) as fb, open_gguf(c) as fc:
        assert fa.metadata["general.file_type"] == 0 and fb.metadata["general.file_type"] == 32
        name = "blk.0.ffn_down_exps.weight"
        assert fa.tensor(name).qtype == T.F32 and fb.tensor(name).qtype == T.BF16
        assert fb.tensor("blk.0.ffn_gate_inp.weight").qtype == T.F32
        wa, wb = _f32(fa, name), _f32(fb, name)
        # bf16 keeps 8 significand bits: round-to-nearest error <= 2^-8 relative
        np.testing.assert_allclose(wb, wa, rtol=2.0 ** -8, atol=0)
        assert not np.array_equal(wa, _f32(fc, name))
        std = wa.std()   # std ~ 1/sqrt(fan_in = 256)
        assert 0.9 / 16 < std < 1.1 / 16, std


def test_bench_shapes_are_the_real_configs():
    def ne(arch, variant, n_vocab, layers=None):
        s = archs.spec(arch, "bench", variant, n_vocab, layers)
        return s, {t.name: t.ne for t in s.tensors}
    s, t = ne("qwen3moe", None, 151936)
    assert t["blk.0.ffn_gate_exps.weight"] == (2048, 768, 128)
    assert t["blk.0.attn_q.weight"] == (2048, 4096) and t["blk.0.attn_k.weight"] == (2048, 512)
    assert s.keys["expert_used_count"] == 8
    s, t = ne("llama", None, 32000)
    assert t["blk.0.ffn_down_exps.weight"] == (14336, 4096, 8) and t["blk.0.attn_v.weight"] == (4096, 1024)
    s, t = ne("deepseek2", "v3", 102400)
    assert s.keys["block_count"] == 1 and t["blk.0.ffn_gate_exps.weight"] == (7168, 2048, 256)
    assert t["blk.0.attn_q_b.weight"] == (1536, 128 * 192)
    s, t = ne("deepseek2", "v2-lite", 102400, layers=27)
    assert "attention.q_lora_rank" not in s.keys     # real V2-Lite files lack it; llama.cpp skips it at 27 layers
    assert t["blk.0.ffn_gate.weight"] == (2048, 10944) and t["blk.1.ffn_gate_exps.weight"] == (2048, 1408, 64)


def test_layers_option_keeps_a_moe_layer():
    with open_gguf(cached_model("llama", layers=1)) as g:
        assert g.arch_get("block_count") == 1 and "blk.1.attn_q.weight" not in g.tensors
    s = archs.spec("deepseek", "tiny", None, 1000, layers=1)
    assert s.keys["leading_dense_block_count"] == 0
    assert "blk.0.ffn_gate_inp.weight" in {t.name for t in s.tensors}


def test_user_errors():
    with pytest.raises(LocalMoEError, match="unknown variant"):
        build("qwen3moe", variant="v9")
    with pytest.raises(LocalMoEError, match="unknown arch"):
        build("gpt5")
    with pytest.raises(LocalMoEError, match="layers"):
        build("llama", layers=0)
    assert main(["--arch", "deepseek2", "--variant", "nope", "--out", "x.gguf"]) == 1


def test_readme_command(tmp_path):
    out = tmp_path / "tiny-qwen3moe.gguf"
    r = subprocess.run([sys.executable, "-m", "models.build", "--arch", "qwen3moe", "--size", "tiny",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with open_gguf(out) as g:
        assert g.arch == "qwen3moe" and g.arch_get("block_count") == 2


def _llama_logits(path, text=b"The quick brown fox jumps over the lazy dog"):
    import llama_cpp   # unconditional: a missing llama-cpp-python fails the test
    m = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    toks = m.tokenize(text)
    m.eval(toks)
    out = np.array(m.scores[: len(toks)], dtype=np.float32)
    m.close()
    return out


@pytest.mark.reference
@pytest.mark.parametrize("arch,variant", MODELS)
def test_llama_cpp_runs_it(arch, variant):
    logits = _llama_logits(tiny(arch, variant))
    assert logits.shape[0] >= 5 and np.isfinite(logits).all()
    # positions see different tokens: logits must differ by far more than rounding (abs 1e-3)
    assert np.abs(np.diff(logits, axis=0)).max(axis=1).min() > 1e-3
    assert 0.1 < logits.std() < 100


@pytest.mark.reference
def test_llama_cpp_split_and_fused_mla_agree():
    """The two on-disk MLA forms of one model give the same logits in llama.cpp (abs tol 0.05: f16 paths differ)."""
    a = _llama_logits(tiny("deepseek2", "v3"))
    b = _llama_logits(tiny("deepseek2", "v3-kvb"))
    np.testing.assert_allclose(a, b, atol=0.05, rtol=0)

"""Per-architecture hyperparameters and tensor layouts, as llama.cpp loads them.

Shapes are written in ggml `ne` order (row length first), exactly as in
llama.cpp's load_arch_tensors, so they can be checked against it line by line;
the writer reverses them into numpy order. Key names are relative to the
architecture prefix (`ARCH.`), values typed by the writer (int -> uint32).
"""
from dataclasses import dataclass, field
from typing import Callable

from localmoe.errors import LocalMoEError


@dataclass(frozen=True)
class Tensor:
    name: str
    ne: tuple[int, ...]          # ggml order: ne[0] is the row length
    init: str = "w"              # w | embd | norm | router | bias | probs_b
    # (source tensor, fn): the values are fn(source values), e.g. a split of attn_kv_b
    derive: "tuple[Tensor, Callable] | None" = None


@dataclass
class Spec:
    arch: str
    vocab: str
    keys: dict = field(default_factory=dict)
    tensors: list = field(default_factory=list)
    pre: str | None = None       # overrides tokenizer.ggml.pre


# Real configs (HF config.json) for bench; tiny keeps the structure but shrinks
# every width to a multiple of 256 where it is a row length (K-quants need it).
CONFIGS = {
    ("llama", "8x7b"): dict(
        bench=dict(n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_expert=8, n_used=2, n_layer=2),
        tiny=dict(n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=8, n_used=2, n_layer=2),
        ctx=32768, rope_base=1e6, eps=1e-5),
    ("llama", "8x22b"): dict(
        bench=dict(n_embd=6144, n_head=48, n_head_kv=8, n_ff=16384, n_expert=8, n_used=2, n_layer=2),
        tiny=dict(n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=8, n_used=2, n_layer=2),
        ctx=65536, rope_base=1e6, eps=1e-5),
    ("qwen2moe", "a2.7b"): dict(
        bench=dict(n_embd=2048, n_head=16, n_head_kv=16, n_ff=5632, n_ff_exp=1408, n_ff_shexp=5632,
                   n_expert=60, n_used=4, n_layer=2),
        tiny=dict(n_embd=256, n_head=4, n_head_kv=4, n_ff=512, n_ff_exp=256, n_ff_shexp=512,
                  n_expert=8, n_used=2, n_layer=2),
        ctx=8192, rope_base=1e6, eps=1e-6),
    ("qwen3moe", "30b-a3b"): dict(
        bench=dict(n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_ff=6144, n_ff_exp=768,
                   n_expert=128, n_used=8, n_layer=2),
        tiny=dict(n_embd=256, n_head=4, n_head_kv=2, head_dim=128, n_ff=768, n_ff_exp=256,
                  n_expert=16, n_used=4, n_layer=2),
        ctx=40960, rope_base=1e6, eps=1e-6),
    ("qwen3moe", "235b-a22b"): dict(
        bench=dict(n_embd=4096, n_head=64, n_head_kv=4, head_dim=128, n_ff=12288, n_ff_exp=1536,
                   n_expert=128, n_used=8, n_layer=2),
        tiny=dict(n_embd=256, n_head=4, n_head_kv=2, head_dim=128, n_ff=768, n_ff_exp=256,
                  n_expert=16, n_used=4, n_layer=2),
        ctx=40960, rope_base=1e6, eps=1e-6),
    ("olmoe", "1b-7b"): dict(
        bench=dict(n_embd=2048, n_head=16, n_head_kv=16, n_ff=1024, n_expert=64, n_used=8, n_layer=2),
        tiny=dict(n_embd=256, n_head=4, n_head_kv=4, n_ff=256, n_expert=16, n_used=4, n_layer=2),
        ctx=4096, rope_base=10000.0, eps=1e-5),
    ("deepseek", "16b"): dict(
        bench=dict(n_embd=2048, n_head=16, n_head_kv=16, n_ff=10944, n_ff_exp=1408, n_expert=64,
                   n_used=6, n_shared=2, n_lead=1, n_layer=3),
        tiny=dict(n_embd=256, n_head=4, n_head_kv=4, n_ff=512, n_ff_exp=256, n_expert=16,
                  n_used=4, n_shared=2, n_lead=1, n_layer=3),
        ctx=4096, rope_base=10000.0, eps=1e-6),
    # MLA dims default to the real ones (qk_nope 128, qk_rope 64, v 128) at both sizes; a config may
    # set mla=(nope, rope, v). yarn=False writes no YaRN keys (plain RoPE up to ctx).
    ("deepseek2", "v2-lite"): dict(
        bench=dict(n_embd=2048, n_head=16, n_ff=10944, n_ff_exp=1408, n_expert=64, n_used=6,
                   n_shared=2, n_lead=1, n_layer=3, q_lora=0, kv_lora=512),
        tiny=dict(n_embd=256, n_head=4, n_ff=512, n_ff_exp=256, n_expert=16, n_used=4,
                  n_shared=2, n_lead=1, n_layer=3, q_lora=0, kv_lora=256),
        ctx=163840, rope_base=10000.0, eps=1e-6, groups=(1, 1), scale=1.0, norm=False,
        gating="softmax", mscale_all=0.707),
    ("deepseek2", "v2"): dict(
        bench=dict(n_embd=5120, n_head=128, n_ff=12288, n_ff_exp=1536, n_expert=160, n_used=6,
                   n_shared=2, n_lead=1, n_layer=2, q_lora=1536, kv_lora=512, groups=(8, 3)),
        tiny=dict(n_embd=256, n_head=4, n_ff=512, n_ff_exp=256, n_expert=16, n_used=4,
                  n_shared=2, n_lead=1, n_layer=3, q_lora=256, kv_lora=256, groups=(4, 2)),
        ctx=163840, rope_base=10000.0, eps=1e-6, scale=16.0, norm=False,
        gating="softmax", mscale_all=0.707),
    ("deepseek2", "v3"): dict(
        bench=dict(n_embd=7168, n_head=128, n_ff=18432, n_ff_exp=2048, n_expert=256, n_used=8,
                   n_shared=1, n_lead=3, n_layer=1, q_lora=1536, kv_lora=512, groups=(8, 4)),
        tiny=dict(n_embd=256, n_head=4, n_ff=512, n_ff_exp=256, n_expert=16, n_used=4,
                  n_shared=1, n_lead=1, n_layer=3, q_lora=256, kv_lora=256, groups=(4, 2)),
        ctx=163840, rope_base=10000.0, eps=1e-6, scale=2.5, norm=True,
        gating="sigmoid", mscale_all=1.0),
}
DEFAULT_VARIANT = {"llama": "8x7b", "qwen2moe": "a2.7b", "qwen3moe": "30b-a3b", "olmoe": "1b-7b",
                   "deepseek": "16b", "deepseek2": "v2-lite"}
VOCAB = {"llama": "llama-spm", "qwen2moe": "qwen2", "qwen3moe": "qwen2", "olmoe": "gpt-2",
         "deepseek": "deepseek-llm", "deepseek2": "deepseek-llm"}
KVB_SUFFIX = "-kvb"   # deepseek2: legacy single attn_kv_b instead of attn_k_b/attn_v_b
ARCHS = tuple(DEFAULT_VARIANT)
MLA_DIMS = (128, 64, 128)   # DeepSeek-V2/V3's (qk_nope, qk_rope, v) per head


def variants(arch: str) -> list[str]:
    base = [v for a, v in CONFIGS if a == arch]
    return base + [v + KVB_SUFFIX for v in base] if arch == "deepseek2" else base


def resolve(arch: str, variant: str | None) -> tuple[str, bool]:
    """(config variant, legacy kv_b form) for a user-given variant."""
    if arch not in DEFAULT_VARIANT:
        raise LocalMoEError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    variant = variant or DEFAULT_VARIANT[arch]
    if variant not in variants(arch):
        raise LocalMoEError(f"unknown variant {variant!r} for {arch}; choose one of {', '.join(variants(arch))}")
    kvb = variant.endswith(KVB_SUFFIX)
    return (variant[: -len(KVB_SUFFIX)] if kvb else variant), kvb


def spec(arch: str, size: str, variant: str | None, n_vocab: int, layers: int | None = None) -> Spec:
    if size not in ("tiny", "bench"):
        raise LocalMoEError(f"unknown size {size!r}; choose tiny or bench")
    base, kvb = resolve(arch, variant)
    cfg = CONFIGS[(arch, base)]
    h = dict(cfg[size])
    if layers is not None:
        if layers < 1:
            raise LocalMoEError(f"--layers must be >= 1, got {layers}")
        h["n_layer"] = layers
    if "n_lead" in h:
        # keep at least one MoE layer when the layer count is cut down
        h["n_lead"] = min(h["n_lead"], h["n_layer"] - 1)
    h["head_dim"] = h.get("head_dim", h["n_embd"] // h["n_head"])
    s = Spec(arch=arch, vocab=VOCAB[arch])
    s.keys.update({
        "context_length": cfg["ctx"], "embedding_length": h["n_embd"], "block_count": h["n_layer"],
        "feed_forward_length": h["n_ff"], "attention.head_count": h["n_head"],
        "rope.freq_base": float(cfg["rope_base"]), "attention.layer_norm_rms_epsilon": float(cfg["eps"]),
        "expert_count": h["n_expert"], "expert_used_count": h["n_used"],
    })
    if arch != "deepseek2":
        s.keys["attention.head_count_kv"] = h["n_head_kv"]
    BUILDERS[arch](s, h, n_vocab, cfg, kvb)
    return s


def _embd_out(s: Spec, h: dict, n_vocab: int) -> None:
    s.tensors.append(Tensor("token_embd.weight", (h["n_embd"], n_vocab), "embd"))
    s.tensors.append(Tensor("output_norm.weight", (h["n_embd"],), "norm"))
    s.tensors.append(Tensor("output.weight", (h["n_embd"], n_vocab)))


def _attn(s: Spec, i: int, h: dict, bias=False, qk_norm: str | None = None) -> None:
    d, hd = h["n_embd"], h["head_dim"]
    nq, nkv = hd * h["n_head"], hd * h["n_head_kv"]
    p = f"blk.{i}."
    s.tensors += [Tensor(p + "attn_norm.weight", (d,), "norm"),
                  Tensor(p + "attn_q.weight", (d, nq)),
                  Tensor(p + "attn_k.weight", (d, nkv)),
                  Tensor(p + "attn_v.weight", (d, nkv))]
    if bias:
        s.tensors += [Tensor(p + "attn_q.bias", (nq,), "bias"),
                      Tensor(p + "attn_k.bias", (nkv,), "bias"),
                      Tensor(p + "attn_v.bias", (nkv,), "bias")]
    if qk_norm == "head":        # per-head RMS norm (Qwen3)
        s.tensors += [Tensor(p + "attn_q_norm.weight", (hd,), "norm"),
                      Tensor(p + "attn_k_norm.weight", (hd,), "norm")]
    elif qk_norm == "full":      # norm over the whole projection (OLMoE)
        s.tensors += [Tensor(p + "attn_q_norm.weight", (nq,), "norm"),
                      Tensor(p + "attn_k_norm.weight", (nkv,), "norm")]
    s.tensors.append(Tensor(p + "attn_output.weight", (nq, d)))


def _dense_ffn(s: Spec, i: int, d: int, ff: int, suffix: str = "") -> None:
    p = f"blk.{i}."
    s.tensors += [Tensor(f"{p}ffn_gate{suffix}.weight", (d, ff)),
                  Tensor(f"{p}ffn_up{suffix}.weight", (d, ff)),
                  Tensor(f"{p}ffn_down{suffix}.weight", (ff, d))]


def _moe(s: Spec, i: int, d: int, ff: int, n_expert: int) -> None:
    p = f"blk.{i}."
    s.tensors += [Tensor(p + "ffn_gate_inp.weight", (d, n_expert), "router"),
                  Tensor(p + "ffn_gate_exps.weight", (d, ff, n_expert)),
                  Tensor(p + "ffn_up_exps.weight", (d, ff, n_expert)),
                  Tensor(p + "ffn_down_exps.weight", (ff, d, n_expert))]


def _llama(s: Spec, h: dict, n_vocab: int, cfg: dict, kvb: bool) -> None:
    s.keys.update({"vocab_size": n_vocab, "rope.dimension_count": h["head_dim"]})
    _embd_out(s, h, n_vocab)
    for i in range(h["n_layer"]):
        _attn(s, i, h)
        s.tensors.append(Tensor(f"blk.{i}.ffn_norm.weight", (h["n_embd"],), "norm"))
        _moe(s, i, h["n_embd"], h["n_ff"], h["n_expert"])


def _qwen(s: Spec, h: dict, n_vocab: int, cfg: dict, kvb: bool) -> None:
    qwen3 = s.arch == "qwen3moe"
    s.keys["expert_feed_forward_length"] = h["n_ff_exp"]
    if qwen3:
        s.keys.update({"attention.key_length": h["head_dim"], "attention.value_length": h["head_dim"]})
    else:
        s.keys["expert_shared_feed_forward_length"] = h["n_ff_shexp"]
    _embd_out(s, h, n_vocab)
    for i in range(h["n_layer"]):
        _attn(s, i, h, bias=not qwen3, qk_norm="head" if qwen3 else None)
        s.tensors.append(Tensor(f"blk.{i}.ffn_norm.weight", (h["n_embd"],), "norm"))
        _moe(s, i, h["n_embd"], h["n_ff_exp"], h["n_expert"])
        if not qwen3:
            s.tensors.append(Tensor(f"blk.{i}.ffn_gate_inp_shexp.weight", (h["n_embd"],), "router"))
            _dense_ffn(s, i, h["n_embd"], h["n_ff_shexp"], "_shexp")


def _olmoe(s: Spec, h: dict, n_vocab: int, cfg: dict, kvb: bool) -> None:
    s.pre = "olmo"
    _embd_out(s, h, n_vocab)
    for i in range(h["n_layer"]):
        _attn(s, i, h, qk_norm="full")
        s.tensors.append(Tensor(f"blk.{i}.ffn_norm.weight", (h["n_embd"],), "norm"))
        _moe(s, i, h["n_embd"], h["n_ff"], h["n_expert"])


def _deepseek(s: Spec, h: dict, n_vocab: int, cfg: dict, kvb: bool) -> None:
    s.keys.update({
        "rope.dimension_count": h["head_dim"], "rope.scaling.type": "none",
        "leading_dense_block_count": h["n_lead"], "vocab_size": n_vocab,
        "expert_feed_forward_length": h["n_ff_exp"], "expert_weights_scale": 1.0,
        "expert_shared_count": h["n_shared"],
    })
    _embd_out(s, h, n_vocab)
    d = h["n_embd"]
    for i in range(h["n_layer"]):
        _attn(s, i, h)
        s.tensors.append(Tensor(f"blk.{i}.ffn_norm.weight", (d,), "norm"))
        _ffn_deepseek(s, i, h)


def _ffn_deepseek(s: Spec, i: int, h: dict) -> None:
    d = h["n_embd"]
    if i < h["n_lead"]:
        _dense_ffn(s, i, d, h["n_ff"])
        return
    _moe(s, i, d, h["n_ff_exp"], h["n_expert"])
    _dense_ffn(s, i, d, h["n_ff_exp"] * h["n_shared"], "_shexp")


def _deepseek2(s: Spec, h: dict, n_vocab: int, cfg: dict, kvb: bool) -> None:
    d, nh, kv_lora, q_lora = h["n_embd"], h["n_head"], h["kv_lora"], h["q_lora"]
    nope, rope, v = cfg.get("mla", MLA_DIMS)
    groups = h.get("groups", cfg.get("groups"))
    s.keys.update({
        "leading_dense_block_count": h["n_lead"], "vocab_size": n_vocab,
        "attention.kv_lora_rank": kv_lora,
        "expert_feed_forward_length": h["n_ff_exp"], "expert_shared_count": h["n_shared"],
        "expert_weights_scale": float(cfg["scale"]),
        "expert_group_count": groups[0], "expert_group_used_count": groups[1],
        "expert_gating_func": {"softmax": 1, "sigmoid": 2}[cfg["gating"]],
        "rope.dimension_count": rope,
    })
    if cfg.get("yarn", True):
        s.keys.update({
            "rope.scaling.type": "yarn", "rope.scaling.factor": 40.0,
            "rope.scaling.original_context_length": 4096,
            "rope.scaling.yarn_beta_fast": 32.0, "rope.scaling.yarn_beta_slow": 1.0,
            # the converter stores 0.1 * mscale_all_dim; llama.cpp divides it back out
            "rope.scaling.yarn_log_multiplier": 0.1 * cfg["mscale_all"],
        })
    else:
        s.keys["rope.scaling.type"] = "none"
    if cfg["norm"]:
        s.keys["expert_weights_norm"] = True
    if q_lora or h["n_layer"] not in (26, 27):
        # llama.cpp reads q_lora_rank unless n_layer says "Lite" (26/27): 0 = no q LoRA
        s.keys["attention.q_lora_rank"] = q_lora
    if kvb:   # legacy converters: MHA view, one kv_b tensor
        s.keys.update({"attention.head_count_kv": nh, "attention.key_length": nope + rope,
                       "attention.value_length": v})
    else:     # current converter: MQA over the latent, split k_b / v_b
        s.keys.update({"attention.head_count_kv": 1, "attention.key_length": kv_lora + rope,
                       "attention.value_length": kv_lora,
                       "attention.key_length_mla": nope + rope, "attention.value_length_mla": v})
    _embd_out(s, h, n_vocab)
    for i in range(h["n_layer"]):
        p = f"blk.{i}."
        s.tensors.append(Tensor(p + "attn_norm.weight", (d,), "norm"))
        if q_lora:
            s.tensors += [Tensor(p + "attn_q_a_norm.weight", (q_lora,), "norm"),
                          Tensor(p + "attn_q_a.weight", (d, q_lora)),
                          Tensor(p + "attn_q_b.weight", (q_lora, nh * (nope + rope)))]
        else:
            s.tensors.append(Tensor(p + "attn_q.weight", (d, nh * (nope + rope))))
        s.tensors += [Tensor(p + "attn_kv_a_norm.weight", (kv_lora,), "norm"),
                      Tensor(p + "attn_kv_a_mqa.weight", (d, kv_lora + rope))]
        kv_b = Tensor(p + "attn_kv_b.weight", (kv_lora, nh * (nope + v)))
        s.tensors += [kv_b] if kvb else _split_kv_b(kv_b, nh, kv_lora, nope, v)
        s.tensors.append(Tensor(p + "attn_output.weight", (nh * v, d)))
        s.tensors.append(Tensor(p + "ffn_norm.weight", (d,), "norm"))
        _ffn_deepseek(s, i, h)
        if i >= h["n_lead"] and cfg["gating"] == "sigmoid":
            s.tensors.append(Tensor(p + "exp_probs_b.bias", (h["n_expert"],), "probs_b"))


def _split_kv_b(kv_b: Tensor, nh: int, kv_lora: int, nope: int, v: int) -> list[Tensor]:
    """attn_k_b / attn_v_b holding the same numbers as kv_b, split as convert_hf_to_gguf does."""
    def heads(a):   # numpy (nh*(nope+v), kv_lora) -> (nh, nope+v, kv_lora)
        return a.reshape(nh, nope + v, kv_lora)
    k_name, v_name = kv_b.name.replace("kv_b", "k_b"), kv_b.name.replace("kv_b", "v_b")
    return [Tensor(k_name, (nope, kv_lora, nh), derive=(kv_b, lambda a: heads(a)[:, :nope].transpose(0, 2, 1))),
            Tensor(v_name, (kv_lora, v, nh), derive=(kv_b, lambda a: heads(a)[:, nope:]))]


BUILDERS = {"llama": _llama, "qwen2moe": _qwen, "qwen3moe": _qwen, "olmoe": _olmoe,
            "deepseek": _deepseek, "deepseek2": _deepseek2}

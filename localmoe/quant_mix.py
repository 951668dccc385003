"""Per-tensor type choice for a quantization mix, the same as llama.cpp's.

This follows llama.cpp's src/llama-quant.cpp (tensor_allows_quantization,
llama_tensor_get_type_impl, tensor_type_fallback) for the mixes we write,
without an importance matrix. Tensors are visited in llama.cpp's order
(`tensor_order`), because some rules count attn_v tensors as they go.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as F

from .errors import UnsupportedError

# mix name -> (llama file type, default tensor type)
MIXES: dict[str, tuple[F, T]] = {
    "Q4_0": (F.MOSTLY_Q4_0, T.Q4_0),
    "Q8_0": (F.MOSTLY_Q8_0, T.Q8_0),
    "Q3_K_S": (F.MOSTLY_Q3_K_S, T.Q3_K),
    "Q3_K_M": (F.MOSTLY_Q3_K_M, T.Q3_K),
    "Q3_K_L": (F.MOSTLY_Q3_K_L, T.Q3_K),
    "Q4_K_S": (F.MOSTLY_Q4_K_S, T.Q4_K),
    "Q4_K_M": (F.MOSTLY_Q4_K_M, T.Q4_K),
    "Q5_K_S": (F.MOSTLY_Q5_K_S, T.Q5_K),
    "Q5_K_M": (F.MOSTLY_Q5_K_M, T.Q5_K),
    "Q6_K": (F.MOSTLY_Q6_K, T.Q6_K),
}

# a row length a type cannot hold falls back to a 32-block type
_FALLBACK = {T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_QUANTIZED = set(T) - {T.F32, T.F16, T.BF16, T.F64, T.I8, T.I16, T.I32, T.I64}
_BLK = re.compile(r"blk\.(\d+)\.")


def layer_of(name: str) -> int:
    m = _BLK.match(name)
    return int(m.group(1)) if m else -1


def tensor_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's loader order: non-layer tensors first, then by layer, then by name."""
    return sorted(names, key=lambda n: (layer_of(n), n))


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def allows_quantization(name: str, n_dims: int) -> bool:
    """The subset of llama.cpp's tensor_allows_quantization that MoE LLM files can hit."""
    return (n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name and "attn_rel_b.weight" not in name
            and name not in ("position_embd.weight", "token_types.weight"))


@dataclass
class ModelFacts:
    """The hyperparameters llama.cpp's rules look at."""
    arch: str
    n_layer: int
    n_expert: int
    n_gqa: int
    is_70b: bool = False

    @classmethod
    def from_metadata(cls, md: Mapping) -> "ModelFacts":
        arch = md["general.architecture"]
        first = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # per-layer arrays: layer 0
        n_layer = int(md[f"{arch}.block_count"])
        n_head = int(first(md.get(f"{arch}.attention.head_count", 0)))
        n_head_kv = int(first(md.get(f"{arch}.attention.head_count_kv", n_head)))
        n_expert = int(md.get(f"{arch}.expert_count", 0))
        is_70b = arch == "llama" and n_expert != 8 and n_layer == 80 and n_head != n_head_kv
        return cls(arch, n_layer, n_expert, n_head // n_head_kv if n_head_kv else 0, is_70b)


@dataclass
class _State:
    facts: ModelFacts
    n_attention_wv: int
    tied_embeddings: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mix_rule(st: _State, mix: str, new: T, name: str, cat: str, ne0: int) -> T:
    f = st.facts
    attn_v_like = cat in ("attn_v", "attn_qkv", "attn_kv_b")
    if cat == "output" or (st.tied_embeddings and cat == "token_embd"):
        if f.arch == "falcon" or ne0 % GGML_QUANT_SIZES[new][0]:
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if cat == "token_embd":
        return new
    if attn_v_like:
        if mix == "Q3_K_M":
            new = T.Q5_K if st.i_attention_wv < 2 else T.Q4_K
        elif mix == "Q3_K_L":
            new = T.Q5_K
        elif mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new = T.Q6_K
        elif mix == "Q4_K_S" and st.i_attention_wv < 4:
            new = T.Q5_K
        if f.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if f.n_expert == 8:
            new = T.Q8_0
        st.i_attention_wv += 1
        return new
    if cat == "attn_k":
        return T.Q8_0 if f.n_expert == 8 else new
    if cat == "ffn_down":
        i, n = _ffn_down_layer(st, name)
        falcon = f.arch == "falcon"
        if mix == "Q3_K_M":
            new = T.Q5_K if i < n // 16 else T.Q4_K if (not falcon or _use_more_bits(i, n)) else T.Q3_K
        elif mix == "Q3_K_L":
            new = T.Q4_K if falcon else T.Q5_K
        elif mix == "Q4_K_M":
            if falcon:
                new = T.Q6_K if i < n // 16 else T.Q5_K if _use_more_bits(i, n) else T.Q4_K
            elif _use_more_bits(i, n):
                new = T.Q6_K
        elif mix == "Q5_K_M" and _use_more_bits(i, n):
            new = T.Q6_K
        elif mix == "Q4_K_S" and not falcon and i < n // 8:
            new = T.Q5_K
        return new
    if cat == "attn_output":
        if f.arch != "falcon":
            if f.n_expert == 8:
                if mix in ("Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                    new = T.Q5_K
            elif mix == "Q3_K_M":
                new = T.Q4_K
            elif mix == "Q3_K_L":
                new = T.Q5_K
        elif mix == "Q3_K_L":
            new = T.Q4_K
        return new
    return new


def _ffn_down_layer(st: _State, name: str) -> tuple[int, int]:
    """(layer, n_layer) as llama.cpp's layer_info: a running count, or parsed from the name for MoE models."""
    n, i = st.facts.n_layer, st.i_ffn_down
    st.i_ffn_down += 1
    if st.facts.n_expert > 1:
        i = layer_of(name)
        if not 0 <= i < n:
            raise UnsupportedError(f"cannot determine the layer of tensor {name}")
    return i, n


def plan_types(mix: str, metadata: Mapping, tensors: Iterable[tuple[str, T, tuple[int, ...]]]) -> dict[str, T]:
    """name -> output type, for tensors given as (name, current type, numpy shape)."""
    if mix not in MIXES:
        raise UnsupportedError(f"unknown quantization type {mix!r}; choose one of {', '.join(MIXES)}")
    default = MIXES[mix][1]
    tensors = {name: (qtype, tuple(shape)) for name, qtype, shape in tensors}
    order = tensor_order(tensors)
    st = _State(ModelFacts.from_metadata(metadata),
                n_attention_wv=sum(category(n) in ("attn_v", "attn_qkv", "attn_kv_b") for n in order),
                tied_embeddings="output.weight" not in tensors)
    out = {}
    for name in order:
        qtype, shape = tensors[name]
        if not allows_quantization(name, len(shape)):
            out[name] = qtype
            continue
        ne0 = shape[-1]
        new = _mix_rule(st, mix, default, name, category(name), ne0)
        if ne0 % GGML_QUANT_SIZES[new][0]:
            new = _FALLBACK.get(new, new)
            if ne0 % GGML_QUANT_SIZES[new][0]:
                new = T.F16
        out[name] = new
    return out


def is_quantized(qtype: T) -> bool:
    return qtype in _QUANTIZED

"""What every architecture shares: hyperparameters from GGUF metadata and a
pre-norm transformer block (attention + FFN). Arch files subclass both and
override only their quirks (`qk_norm`, `ffn`, routing)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from gguf import GGMLQuantizationType

from localmoe.errors import GGUFFormatError, UnsupportedError
from localmoe.layers import (Rope, RunBuffers, apply_rope, attention, matmul_f32_sgemm, matvec_f32_vec_dot, rms_norm,
                             sigmoid, softmax)
from localmoe.moe import moe_ffn
from localmoe.weights import Activation

def _scalar(g, key: str, default=None, required=False):
    v = g.arch_get(key, None)
    if v is None:
        if required:
            raise GGUFFormatError(f"missing metadata {g.arch}.{key}")
        return default
    if isinstance(v, (list, tuple, np.ndarray)):
        vals = set(np.asarray(v).tolist())
        if len(vals) != 1:
            raise UnsupportedError(f"{g.arch}.{key} varies per layer ({sorted(vals)}); not supported")
        v = vals.pop()
    return v


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    norm_eps: float
    kq_scale: float
    rope: Rope
    n_expert: int
    n_expert_used: int
    expert_weights_scale: float  # 0 or 1 = no scaling (llama.cpp)

    @classmethod
    def from_gguf(cls, g, n_expert_used: int | None = None, **extra) -> "ModelArgs":
        n_embd = int(_scalar(g, "embedding_length", required=True))
        n_head = int(_scalar(g, "attention.head_count", required=True))
        hd_k = int(_scalar(g, "attention.key_length", n_embd // n_head))
        n_ctx_train = int(_scalar(g, "context_length", required=True))
        n_expert = int(_scalar(g, "expert_count", 0))
        n_used = int(_scalar(g, "expert_used_count", 0))
        if n_expert_used is not None:
            if not 1 <= n_expert_used <= n_expert:
                raise UnsupportedError(f"n_expert_used={n_expert_used}: this model has {n_expert} experts "
                                       f"(use 1..{n_expert})")
            n_used = int(n_expert_used)
        emb = g.tensors["token_embd.weight"]
        base = dict(
            arch=g.arch, n_vocab=int(emb.shape[0]), n_embd=n_embd,
            n_layer=int(_scalar(g, "block_count", required=True)),
            n_head=n_head, n_head_kv=int(_scalar(g, "attention.head_count_kv", n_head)),
            head_dim_k=hd_k, head_dim_v=int(_scalar(g, "attention.value_length", n_embd // n_head)),
            n_ctx_train=n_ctx_train,
            norm_eps=float(_scalar(g, "attention.layer_norm_rms_epsilon", required=True)),
            kq_scale=1.0 / math.sqrt(hd_k),  # llama.cpp ignores attention.scale for these archs
            rope=cls.rope_from_gguf(g, int(_scalar(g, "rope.dimension_count", hd_k)), n_ctx_train),
            n_expert=n_expert, n_expert_used=n_used,
            expert_weights_scale=float(_scalar(g, "expert_weights_scale", 0.0)),
        )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {**base, **extra}.items() if k in names})

    rope_neox = False  # class attribute, not a field: set per architecture

    @classmethod
    def rope_from_gguf(cls, g, n_rot: int, n_ctx_train: int, yarn_log_mul: float = 0.0,
                       yarn_mscale: float = 1.0) -> Rope:
        """RoPE as llama.cpp's context sets it up (llama_context ctor: freq_scale, YaRN attn_factor)."""
        scaling = str(_scalar(g, "rope.scaling.type", "linear"))
        if scaling not in ("none", "linear", "yarn"):
            raise UnsupportedError(f"rope scaling {scaling!r} is not supported")
        factor = float(_scalar(g, "rope.scaling.factor", 0.0) or 0.0)
        freq_scale = 1.0 / factor if factor and scaling != "none" else 1.0
        ext = 1.0 if scaling == "yarn" else 0.0
        attn = 1.0
        if ext:
            f = 1.0 / freq_scale

            def mscale(m):
                return 1.0 if f <= 1.0 else 0.1 * m * math.log(f) + 1.0
            attn = mscale(yarn_mscale) / mscale(yarn_log_mul) if yarn_log_mul else mscale(1.0)
            attn /= 1.0 + 0.1 * math.log(f)  # rope_yarn multiplies this back in
        attn *= float(_scalar(g, "rope.scaling.attn_factor", 1.0))
        return Rope(n_rot=n_rot, neox=cls.rope_neox, freq_base=float(_scalar(g, "rope.freq_base", 10000.0)),
                    freq_scale=freq_scale, ext_factor=ext, attn_factor=attn,
                    beta_fast=float(_scalar(g, "rope.scaling.yarn_beta_fast", 32.0)),
                    beta_slow=float(_scalar(g, "rope.scaling.yarn_beta_slow", 1.0)),
                    n_ctx_orig=int(_scalar(g, "rope.scaling.original_context_length", n_ctx_train)))


def router_logits(gate, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """gate x f32[n_tok, n_expert] (into `out` when given) for the router weights `gate` (Linear) and
    x f32[n_tok, n_embd]. F32 weights follow llama.cpp's CPU order: ggml_vec_dot_f32 for one
    token, llamafile sgemm for a batch (when its shape allows; else vec_dot per token)."""
    if gate.qtype != GGMLQuantizationType.F32 or gate.bias is not None:
        return gate(x, out)
    n_tok = x.shape[0]
    out = np.empty((n_tok, gate.n_out), np.float32) if out is None else out
    w = gate.rows.view(np.float32).reshape(gate.n_out, gate.n_in)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if n_tok >= 2 and gate.n_in % 16 == 0 and gate.n_out % 4 == 0:
        matmul_f32_sgemm(out, x, w)
    else:
        for t in range(n_tok):
            matvec_f32_vec_dot(out[t], x[t], w)
    return out


def route_topk(logits: np.ndarray, k: int, gating: str, norm: bool, scale: float):
    """llama.cpp's build_moe_ffn routing. logits f32[n_tok, n_expert] -> (ids i32[n_tok, k], w f32[n_tok, k]).

    gating "softmax": probabilities over all experts; "sigmoid": independent scores.
    norm: renormalise the k picked weights to sum 1; scale: multiply them (0/1 = off).
    """
    probs = softmax(logits) if gating == "softmax" else sigmoid(logits)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k].astype(np.int32)
    w = np.take_along_axis(probs, ids, axis=-1)
    if norm:
        # ggml_sum_rows adds in float64 (ggml_vec_sum_f32), then rounds once
        total = w.sum(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
        w = w / np.maximum(total, np.float32(6.103515625e-5))
    if scale not in (0.0, 1.0):
        w = w * np.float32(scale)
    return ids, w.astype(np.float32)


class Block:
    """Pre-norm block: x += attn(norm(x)); x += ffn(norm(x)). `w` holds the
    block's tensors under their GGUF names (attn_q, ffn_gate_inp, ...)."""

    required = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm")
    buf: RunBuffers | None = None  # the Model's scratch (Model sets it); None: new arrays per call

    def __init__(self, args: ModelArgs, w, il: int, store):
        self.args, self.w, self.il, self.store = args, w, il, store
        missing = [n for n in self.required if not hasattr(w, n)]
        if missing:
            raise GGUFFormatError(f"{args.arch} block {il} lacks tensor(s) {', '.join(missing)}")

    def __call__(self, x: np.ndarray, cache, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x f32[n_tok, n_embd] at positions cache.n_past..; cos/sin f32[n_tok, n_rot/2]."""
        a = self.args
        h = self.attention(rms_norm(x, self.w.attn_norm, a.norm_eps), cache, cos, sin)
        x = x + h
        return x + self.ffn(rms_norm(x, self.w.ffn_norm, a.norm_eps))

    def qk_norm(self, q: np.ndarray, k: np.ndarray):
        """q f32[n_tok, n_head, hd], k f32[n_tok, n_head_kv, hd]: hook for QK-norm archs."""
        return q, k

    def attention(self, x, cache, cos, sin) -> np.ndarray:
        a, w = self.args, self.w
        n_tok, buf = x.shape[0], self.buf
        x = Activation(x)  # q, k and v share x's conversion when their types do
        q = w.attn_q(x, None if buf is None else buf.q[:n_tok]).reshape(n_tok, a.n_head, a.head_dim_k)
        k = w.attn_k(x, None if buf is None else buf.k[:n_tok]).reshape(n_tok, a.n_head_kv, a.head_dim_k)
        v = w.attn_v(x, None if buf is None else buf.v[:n_tok]).reshape(n_tok, a.n_head_kv, a.head_dim_v)
        q, k = self.qk_norm(q, k)
        apply_rope(q, cos, sin, a.rope.neox)
        apply_rope(k, cos, sin, a.rope.neox)
        cache.store(self.il, k, v)
        o = attention(q, cache.k[self.il], cache.v[self.il], cache.n_past, a.kq_scale, buf)
        return w.attn_output(o)

    def ffn(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def routed_experts(self, x: np.ndarray, gating: str, norm: bool) -> np.ndarray:
        """The routed-expert sum for x f32[n_tok, n_embd], routing per `route_topk`."""
        a = self.args
        logits = router_logits(self.w.ffn_gate_inp, x, None if self.buf is None else self.buf.router[:x.shape[0]])
        ids, wts = route_topk(logits, a.n_expert_used, gating, norm, a.expert_weights_scale)
        return moe_ffn(self.store, self.il, x, ids, wts)

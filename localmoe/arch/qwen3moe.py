"""Qwen3-MoE: per-head RMS QK-norm before RoPE (neox); softmax routing whose
top-k weights llama.cpp always renormalises (norm_w=true in its graph)."""
from __future__ import annotations

from dataclasses import dataclass

from localmoe.layers import rms_norm

from . import base


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    rope_neox = True

    def check_attention(self, g, il):
        super().check_attention(g, il)
        hd = (self.head_dim_k, self.key("attention.key_length", self.head_dim_k))
        self.expect(g, f"blk.{il}.attn_q_norm.weight", hd)
        self.expect(g, f"blk.{il}.attn_k_norm.weight", hd)


class Block(base.Block):
    required = base.Block.required + ("attn_q_norm", "attn_k_norm", "ffn_gate_inp",
                                      "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")

    def qk_norm(self, q, k):
        eps = self.args.norm_eps
        return rms_norm(q, self.w.attn_q_norm, eps), rms_norm(k, self.w.attn_k_norm, eps)

    def ffn(self, x):
        return self.routed_experts(x, "softmax", norm=True)

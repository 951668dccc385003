"""OLMoE: RMS QK-norm over the whole q / k projection (all heads at once),
neox RoPE, softmax routing without renormalising the top-k weights."""
from __future__ import annotations

from dataclasses import dataclass

from localmoe.layers import rms_norm

from . import base


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    rope_neox = True
    ff_exp_key = "feed_forward_length"  # llama.cpp sizes OLMoE's experts by n_ff

    def check_attention(self, g, il):
        super().check_attention(g, il)
        p, kl = f"blk.{il}.", self.key("attention.key_length", self.head_dim_k)
        self.expect(g, p + "attn_q_norm.weight",
                    (self.n_head * self.head_dim_k, f"{self.key('attention.head_count', self.n_head)} x {kl}"))
        self.expect(g, p + "attn_k_norm.weight",
                    (self.n_head_kv * self.head_dim_k, f"{self.key('attention.head_count_kv', self.n_head_kv)} x {kl}"))


class Block(base.Block):
    required = base.Block.required + ("attn_q_norm", "attn_k_norm", "ffn_gate_inp",
                                      "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")

    def qk_norm(self, q, k):
        eps = self.args.norm_eps
        n = q.shape[0]
        q = rms_norm(q.reshape(n, -1), self.w.attn_q_norm, eps).reshape(q.shape)
        k = rms_norm(k.reshape(n, -1), self.w.attn_k_norm, eps).reshape(k.shape)
        return q, k

    def ffn(self, x):
        return self.routed_experts(x, "softmax", norm=False)

"""Qwen2-MoE: q/k/v biases, neox RoPE, softmax routing (top-k not
renormalised) plus a shared expert gated by sigmoid(ffn_gate_inp_shexp · x)."""
from __future__ import annotations

from dataclasses import dataclass

from localmoe.layers import sigmoid
from localmoe.moe import swiglu_ffn

from . import base


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    rope_neox = True

    def check_moe(self, g, il):
        super().check_moe(g, il)
        p, d = f"blk.{il}.", (self.n_embd, self.key("embedding_length", self.n_embd))
        ff = self.width(g, "expert_shared_feed_forward_length", "ffn_up_shexp")
        self.expect(g, p + "ffn_gate_inp_shexp.weight", d)
        self.expect(g, p + "ffn_gate_shexp.weight", ff, d)
        self.expect(g, p + "ffn_up_shexp.weight", ff, d)
        self.expect(g, p + "ffn_down_shexp.weight", d, ff)


class Block(base.Block):
    required = base.Block.required + ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
                                      "ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")

    def ffn(self, x):
        w = self.w
        out = self.routed_experts(x, "softmax", norm=False)
        gate = sigmoid(w.ffn_gate_inp_shexp(x))  # f32[n_tok, 1]
        return out + swiglu_ffn(x, w.ffn_gate_shexp, w.ffn_up_shexp, w.ffn_down_shexp) * gate

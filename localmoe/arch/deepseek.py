"""DeepSeek (v1 MoE): the first `leading_dense_block_count` layers are dense;
the rest route with softmax (top-k not renormalised, times expert_weights_scale)
and add ungated shared experts. Normal (pairwise) RoPE."""
from __future__ import annotations

from dataclasses import dataclass

from localmoe.moe import swiglu_ffn

from . import base


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    n_layer_dense_lead: int = 0
    rope_neox = False

    @classmethod
    def from_gguf(cls, g, n_expert_used=None, **extra):
        lead = int(base._scalar(g, "leading_dense_block_count", 0))
        return super().from_gguf(g, n_expert_used, n_layer_dense_lead=lead, **extra)


class Block(base.Block):
    def ffn(self, x):
        a, w = self.args, self.w
        if self.il < a.n_layer_dense_lead:
            return swiglu_ffn(x, w.ffn_gate, w.ffn_up, w.ffn_down)
        out = self.routed_experts(x, "softmax", norm=False)
        return out + swiglu_ffn(x, w.ffn_gate_shexp, w.ffn_up_shexp, w.ffn_down_shexp)

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
        lead = base.int_key(g, "leading_dense_block_count", 0)
        return super().from_gguf(g, n_expert_used, n_layer_dense_lead=lead, **extra)

    def is_moe_layer(self, il):
        return il >= self.n_layer_dense_lead

    def layer_why(self, il):
        return self.key("leading_dense_block_count", self.n_layer_dense_lead)

    def check_moe(self, g, il):
        super().check_moe(g, il)
        check_shared_experts(self, g, il)


def check_shared_experts(a: base.ModelArgs, g, il: int) -> None:
    """DeepSeek's shared experts: one FFN expert_shared_count times the routed experts' width."""
    p, d = f"blk.{il}.", (a.n_embd, a.key("embedding_length", a.n_embd))
    n_shared = base.int_key(g, "expert_shared_count", None, lo=1)
    ff, why = a.width(g, a.ff_exp_key, "ffn_up_exps")
    sh = (n_shared * ff, f"{a.key('expert_shared_count', n_shared)} x {why}") if n_shared and ff \
        else a.width(g, None, "ffn_up_shexp")
    for name in ("ffn_gate_shexp", "ffn_up_shexp"):
        a.expect(g, f"{p}{name}.weight", sh, d, why=f"{a.layer_why(il)}: block {il} has experts")
    a.expect(g, p + "ffn_down_shexp.weight", d, sh, why=f"{a.layer_why(il)}: block {il} has experts")


class Block(base.Block):
    def ffn(self, x):
        a, w = self.args, self.w
        if self.il < a.n_layer_dense_lead:
            return swiglu_ffn(x, w.ffn_gate, w.ffn_up, w.ffn_down)
        out = self.routed_experts(x, "softmax", norm=False)
        return out + swiglu_ffn(x, w.ffn_gate_shexp, w.ffn_up_shexp, w.ffn_down_shexp)

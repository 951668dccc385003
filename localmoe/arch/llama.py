"""llama with experts (Mixtral): normal (pairwise) RoPE, softmax over all
experts then the top-k weights renormalised; layers without ffn_gate_inp are dense."""
from __future__ import annotations

from dataclasses import dataclass

from localmoe.moe import swiglu_ffn

from . import base


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    rope_neox = False


class Block(base.Block):
    def ffn(self, x):
        w = self.w
        if not hasattr(w, "ffn_gate_inp"):
            return swiglu_ffn(x, w.ffn_gate, w.ffn_up, w.ffn_down)
        return self.routed_experts(x, "softmax", norm=True)

"""llama with experts (Mixtral): normal (pairwise) RoPE, softmax over all
experts then the top-k weights renormalised. expert_count 0 is a dense llama
(every layer ffn_gate/up/down), as in llama.cpp."""
from __future__ import annotations

from dataclasses import dataclass

from localmoe.moe import swiglu_ffn

from . import base


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    rope_neox = False
    moe_only = False
    ff_exp_key = "feed_forward_length"  # llama.cpp sizes Mixtral's experts by n_ff


class Block(base.Block):
    def ffn(self, x):
        w = self.w
        if not hasattr(w, "ffn_gate_inp"):
            return swiglu_ffn(x, w.ffn_gate, w.ffn_up, w.ffn_down)
        return self.routed_experts(x, "softmax", norm=True)

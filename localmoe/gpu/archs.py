"""What the GPU runner needs to know of each architecture: its quirks as data, so that one
runner serves them all (as localmoe/arch/*.py do for the CPU path).

Leading dense layers need no entry: a block without a router (ffn_gate_inp) runs its dense
FFN. Biases ride on their Linear (qwen2moe's q/k/v)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchGpu:
    qk_norm: str | None = None  # None / "head" (per head) / "full" (over the whole projection)
    attention: str = "mha"      # "mha" (q/k/v, GQA) or "mla" (DeepSeek-V2 latent attention; gpu/mla.py)
    gating: str = "softmax"     # the router's probabilities ("softmax" / "sigmoid")
    norm: bool = False          # renormalise the top-k weights
    shared: str | None = None   # shared experts: None / "plain" (added) / "gated" (sigmoid(ffn_gate_inp_shexp x))

    def routing(self, args) -> tuple[str, bool]:
        """(gating, norm): deepseek2's file says them (expert_gating_func, expert_weights_norm)."""
        return getattr(args, "gating", self.gating), getattr(args, "expert_weights_norm", self.norm)


ARCHS = {
    "qwen3moe": ArchGpu(qk_norm="head", norm=True),
    "olmoe": ArchGpu(qk_norm="full"),
    "llama": ArchGpu(norm=True),
    "qwen2moe": ArchGpu(shared="gated"),
    "deepseek": ArchGpu(shared="plain"),
    "deepseek2": ArchGpu(attention="mla", shared="plain"),
}

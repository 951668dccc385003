"""ExpertStore: where "expert e of layer l" lives, and who asks for it.

Today experts are zero-copy views into the memory-mapped GGUF stacks
(`ffn_{gate,up,down}_exps`, shape (n_expert, out, in)). The memory planner
(a later issue) plugs in here: it can move experts between tiers and uses the
selection stats (`note_selected`) to decide what to keep hot or prefetch.
"""
from __future__ import annotations

import numpy as np

from localmoe.weights import Linear


class ExpertStore:
    def __init__(self, stacks: dict[tuple[int, str], Linear], n_layer: int, n_expert: int):
        self._stacks = stacks  # (layer, GGUF name like "ffn_up_exps") -> Linear (n_expert, out, in)
        self.counts = np.zeros((n_layer, n_expert), np.int64)  # i64[n_layer, n_expert]: tokens routed

    @classmethod
    def from_blocks(cls, blocks, n_expert: int) -> "ExpertStore":
        stacks = {(il, name): t for il, b in enumerate(blocks)
                  for name, t in vars(b).items() if name.endswith("_exps")}
        return cls(stacks, len(blocks), n_expert)

    def has(self, layer: int, name: str) -> bool:
        return (layer, name) in self._stacks

    def expert(self, layer: int, name: str, e: int) -> Linear:
        """Expert e's (out, in) matrix of stack `name` in `layer`."""
        return self._stacks[layer, name].stacked(int(e))

    def note_selected(self, layer: int, expert_ids: np.ndarray) -> None:
        """expert_ids i32[n_tok, k]: the router's picks for this layer's tokens."""
        np.add.at(self.counts[layer], expert_ids.reshape(-1), 1)

    def reset_stats(self) -> None:
        self.counts[:] = 0

"""ExpertStore: where "expert e of layer l" lives, and who asks for it.

`ExpertStore` is both the interface the MoE compute talks to and the resident
implementation: every expert is a zero-copy view into the memory-mapped GGUF
stacks (`ffn_{gate,up,down}_exps`, shape (n_expert, out, in)). The memory
planner's `localmoe.planner.OffloadedExpertStore` overrides `expert` with a
budgeted cache that streams the rest from disk; both hand the same bytes to
the same kernels, so the logits are identical.
"""
from __future__ import annotations

import numpy as np

from localmoe.weights import Linear, row_seq


class ExpertStore:
    def __init__(self, stacks: dict[tuple[int, str], Linear], n_layer: int, n_expert: int):
        self._stacks = stacks  # (layer, GGUF name like "ffn_up_exps") -> Linear (n_expert, out, in)
        self.counts = np.zeros((n_layer, n_expert), np.int64)  # i64[n_layer, n_expert]: tokens routed
        # one i64[n_layer, n_expert] per sequence of the batch being run (Model.forward_seqs), or None:
        # the server's per-request counts while requests share a batch
        self.seq_counts: list[np.ndarray] | None = None

    @classmethod
    def from_blocks(cls, blocks, n_expert: int, **kw) -> "ExpertStore":
        stacks = {(il, name): t for il, b in enumerate(blocks)
                  for name, t in vars(b).items() if name.endswith("_exps") and isinstance(t, Linear)}
        return cls(stacks, len(blocks), n_expert, **kw)

    def has(self, layer: int, name: str) -> bool:
        return (layer, name) in self._stacks

    def expert(self, layer: int, name: str, e: int) -> Linear:
        """Expert e's (out, in) matrix of stack `name` in `layer`. Callers finish computing
        with one expert before asking for the next (moe_ffn does): a cache may reuse its slot."""
        return self._stacks[layer, name].stacked(int(e))

    def resident_stack(self, layer: int, name: str) -> Linear | None:
        """The whole (n_expert, out, in) stack when all its experts are in memory, else None
        (callers then go through `expert`); lets decode run several experts in one call."""
        return self._stacks.get((layer, name))

    def note_selected(self, layer: int, expert_ids: np.ndarray) -> None:
        """expert_ids i32[n_tok, k]: the router's picks for this layer's tokens."""
        np.add.at(self.counts[layer], expert_ids.reshape(-1), 1)
        if self.seq_counts is not None:
            seq = row_seq(expert_ids.shape[0])
            if seq is None:  # one sequence
                np.add.at(self.seq_counts[0][layer], expert_ids.reshape(-1), 1)
            else:
                for s, c in enumerate(self.seq_counts):
                    np.add.at(c[layer], expert_ids[seq == s].reshape(-1), 1)

    def before_block(self, layer: int, x: np.ndarray) -> None:
        """Hook: block `layer` is about to run on the residual stream x f32[n_tok, n_embd]."""

    def stats(self) -> dict:
        """JSON-ready statistics; localmoe.planner.stats formats and saves them."""
        return {"counts": self.counts.tolist()}

    def reset_stats(self) -> None:
        self.counts[:] = 0

    def close(self) -> None:
        """Release threads and files (nothing to do for the mapped store)."""

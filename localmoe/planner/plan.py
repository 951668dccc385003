"""The memory plan: what stays resident, how many expert slots each layer gets,
and the smallest budget that can run the model at all.

Resident tier: every non-expert tensor (copied out of the file), the KV cache,
the run buffers and the expert slots. Disk tier: the GGUF file. A layer with
no slots of its own streams through a shared pool of `n_expert_used` slots
(one layer's active experts), which is what sets the minimum budget.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from localmoe.errors import LocalMoEError
from localmoe.layers import RunBuffers

from .budget import format_size

_EXPS = re.compile(r"^blk\.(\d+)\.(\w+_exps)\.weight$")
N_UBATCH = 512  # localmoe.model.N_UBATCH: tokens per forward pass


class BudgetTooSmallError(LocalMoEError):
    """The RAM budget cannot hold what one decode step needs."""


@dataclass(frozen=True)
class Stack:
    """One routed-expert tensor of a layer: expert e's bytes are at offset + e * expert_bytes."""

    name: str          # GGUF short name, e.g. "ffn_up_exps"
    qtype: int
    shape: tuple       # (n_expert, rows, cols), numpy order
    offset: int        # absolute file offset of expert 0
    expert_bytes: int


@dataclass(frozen=True)
class LayerExperts:
    layer: int
    stacks: tuple[Stack, ...]

    @property
    def expert_bytes(self) -> int:
        return sum(s.expert_bytes for s in self.stacks)


@dataclass(frozen=True)
class Footprint:
    """Bytes the runtime needs, from the same config it runs with."""

    non_expert_bytes: int
    kv_bytes: int
    run_bytes: int
    layers: tuple[LayerExperts, ...]   # MoE layers only
    n_expert: int
    n_expert_used: int
    n_ctx: int
    n_seq: int = 1                     # KV caches of n_ctx positions

    @property
    def max_expert_bytes(self) -> int:
        return max((le.expert_bytes for le in self.layers), default=0)

    @property
    def all_experts_bytes(self) -> int:
        return sum(le.expert_bytes for le in self.layers) * self.n_expert

    @property
    def fixed_bytes(self) -> int:
        return self.non_expert_bytes + self.kv_bytes + self.run_bytes

    @property
    def minimum_bytes(self) -> int:
        return self.fixed_bytes + self.n_expert_used * self.max_expert_bytes


def footprint(gguf_file, args, n_ctx: int, n_seq: int = 1) -> Footprint:
    """args: the architecture's ModelArgs (as localmoe.model builds it); n_seq KV caches of
    n_ctx positions (a server's parallel slots)."""
    stacks: dict[int, list[Stack]] = {}
    non_expert = 0
    n_ff = n_embd = args.n_embd
    for name, t in gguf_file.tensors.items():
        m = _EXPS.match(name)
        if "ffn_up" in name:
            n_ff = max(n_ff, int(t.shape[-2]))
        if m is None:
            non_expert += int(t.n_bytes)
            continue
        n_exp = max(int(t.shape[0]), 1)  # a stack the architecture does not read may be empty
        stacks.setdefault(int(m.group(1)), []).append(
            Stack(m.group(2), int(t.qtype), tuple(int(s) for s in t.shape), int(t.offset), int(t.n_bytes) // n_exp))
    layers = tuple(LayerExperts(il, tuple(sorted(s, key=lambda x: x.name))) for il, s in sorted(stacks.items()))
    # fp16 K and V for every layer and position (localmoe.kv_cache.KVCache)
    kv = n_seq * args.n_layer * n_ctx * args.n_head_kv * (args.head_dim_k + args.head_dim_v) * 2
    ub = min(N_UBATCH, n_ctx)
    # the Model's RunBuffers, and the arrays made per micro-batch: residual stream and norms,
    # expert hidden states and outputs, logits
    acts = ub * 4 * (8 * n_embd + 3 * n_ff * max(args.n_expert_used, 1) + args.n_vocab)
    return Footprint(non_expert, kv, RunBuffers.nbytes(args, n_ctx, ub) + acts, layers, args.n_expert,
                     args.n_expert_used, n_ctx, n_seq)


@dataclass
class Plan:
    budget: int
    fp: Footprint
    slots: dict[int, int]           # MoE layer -> its own expert slots (0: streams through the shared pool)
    shared_slots: int               # pool for layers without slots, each max_expert_bytes
    notes: list[str] = field(default_factory=list)

    @property
    def expert_cache_bytes(self) -> int:
        own = sum(self.slots[le.layer] * le.expert_bytes for le in self.fp.layers)
        return own + self.shared_slots * self.fp.max_expert_bytes

    @property
    def resident_bytes(self) -> int:
        return self.fp.fixed_bytes + self.expert_cache_bytes

    def disk_bytes_per_token(self, hit_rate: float) -> float:
        """Expected expert bytes read per decoded token if `hit_rate` of the selections are cached."""
        total = 0.0
        for le in self.fp.layers:
            if self.slots[le.layer] < self.fp.n_expert:
                miss = 1.0 if self.slots[le.layer] == 0 else 1.0 - hit_rate
                total += miss * self.fp.n_expert_used * le.expert_bytes
        return total

    def describe(self, hit_rate: float) -> dict:
        fp = self.fp
        return {
            "budget_bytes": self.budget,
            "minimum_bytes": fp.minimum_bytes,
            "resident": {"non_expert_bytes": fp.non_expert_bytes, "kv_cache_bytes": fp.kv_bytes,
                         "run_buffer_bytes": fp.run_bytes, "expert_cache_bytes": self.expert_cache_bytes,
                         "total_bytes": self.resident_bytes},
            "n_ctx": fp.n_ctx, "n_expert": fp.n_expert, "n_expert_used": fp.n_expert_used,
            "layers": [{"layer": le.layer, "slots": self.slots[le.layer], "expert_bytes": le.expert_bytes,
                        "uniform_hit_rate": self.slots[le.layer] / fp.n_expert} for le in fp.layers],
            "shared_slots": self.shared_slots,
            "all_experts_bytes": fp.all_experts_bytes,
            "hit_rate": hit_rate,
            "disk_bytes_per_token": self.disk_bytes_per_token(hit_rate),
            "notes": list(self.notes),
        }


def make_plan(fp: Footprint, budget: int) -> Plan:
    """Split what the budget leaves after the fixed part into expert slots, evenly over layers."""
    if budget < fp.minimum_bytes:
        raise BudgetTooSmallError(
            f"RAM budget {format_size(budget)} is below this model's minimum of {format_size(fp.minimum_bytes)} "
            f"({fp.minimum_bytes} bytes): non-expert weights {format_size(fp.non_expert_bytes)} + "
            f"KV cache {format_size(fp.kv_bytes)} (n_ctx={fp.n_ctx}, fp16"
            f"{f', {fp.n_seq} sequences' if fp.n_seq > 1 else ''}) + run buffers "
            f"{format_size(fp.run_bytes)} + one layer's {fp.n_expert_used} active experts "
            f"{format_size(fp.n_expert_used * fp.max_expert_bytes)}; raise the budget or lower n_ctx")
    left = budget - fp.fixed_bytes
    notes = []
    if left >= fp.all_experts_bytes:
        return Plan(budget, fp, {le.layer: fp.n_expert for le in fp.layers}, 0,
                    notes=["every expert fits: each is read from disk once, on first use"])
    per_round = sum(le.expert_bytes for le in fp.layers)
    shared = 0
    if left < per_round:  # not one slot per layer: some layers stream through the shared pool
        shared = fp.n_expert_used
        left -= shared * fp.max_expert_bytes
        notes.append(f"budget below one slot per MoE layer: {shared} shared streaming slots")
    slots = spread_slots(fp, left)
    if shared and all(slots.values()):
        shared, notes = 0, []  # the remainder covered every layer
    return Plan(budget, fp, slots, shared, notes=notes)


def plan_for(gguf_file, args, n_ctx: int, budget: int, n_seq: int = 1) -> Plan:
    return make_plan(footprint(gguf_file, args, n_ctx, n_seq), budget)


def spread_slots(fp, left: int) -> dict[int, int]:
    """Expert slots per MoE layer that `left` bytes buy: the same number in every layer, then the
    remainder one slot at a time from the first layer (layers' experts may differ in size)."""
    per_round = sum(le.expert_bytes for le in fp.layers)
    even = min(left // per_round, fp.n_expert) if per_round else 0
    slots = {le.layer: int(even) for le in fp.layers}
    left -= even * per_round
    for le in fp.layers:
        if slots[le.layer] < fp.n_expert and left >= le.expert_bytes:
            slots[le.layer] += 1
            left -= le.expert_bytes
    return slots

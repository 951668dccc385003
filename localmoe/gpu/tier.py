"""The VRAM expert slots: which experts of each MoE layer live on the device.

Each layer gets the slots the GPU plan gives it, one device buffer per expert tensor
(u8[slots * rows, row_bytes], GGUF rows as stored). Filling and eviction follow the
RAM tier's policies (localmoe.planner.policy, LFU with decay by default): an expert is
loaded into a free slot when first selected (before the step, so it runs there at once;
the initial fill, not counted as a move), and a selected expert whose score beats
the lowest-scoring resident one replaces it, at most MAX_MOVES per layer and step.
A profile (--expert-profile) seeds the scores and the first residents.

Moves copy from the file mapping after the layer's compute, on the same stream
(synchronous for now; pinned buffers and a copy stream are the next step).
"""
from __future__ import annotations

import numpy as np

from localmoe.planner.policy import make_policy

MAX_MOVES = 2  # per layer and step: bounds the host-to-device traffic of one token


class VramExperts:
    def __init__(self, cuda, gguf_file, plan, policy: str, profile: np.ndarray | None):
        """plan: localmoe.planner.gpu.GpuPlan; profile: i64[n_layer, n_expert] hit counts or None."""
        self.n_expert = plan.fp.n_expert
        self.stacks = {}    # (layer, name) -> device u8[slots * rows, row_bytes]
        self.src = {}       # (layer, name) -> host u8[n_expert, rows, row_bytes] (the file mapping)
        self.rows = {}      # (layer, name) -> rows per expert
        self.slot_of = {}   # layer -> i32[n_expert]: VRAM slot or -1
        self.expert_in = {}  # layer -> i64[slots]: expert in each slot or -1
        self.policies = {}
        self.moves = 0
        for le in plan.fp.layers:
            n = plan.slots[le.layer]
            self.slot_of[le.layer] = np.full(self.n_expert, -1, np.int32)
            self.expert_in[le.layer] = np.full(n, -1, np.int64)
            self.policies[le.layer] = pol = make_policy(policy, self.n_expert)
            for st in le.stacks:
                key = (le.layer, st.name)
                t = gguf_file.tensors[f"blk.{le.layer}.{st.name}.weight"]
                rows, rb = st.shape[1], st.expert_bytes // st.shape[1]
                self.src[key] = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(self.n_expert, rows, rb)
                self.rows[key] = rows
                self.stacks[key] = cuda.device_array((n * rows, rb), np.uint8)
            if profile is not None:
                pol.seed(profile[le.layer])
            if n:
                first = (np.argsort(-pol.score, kind="stable")[:n] if profile is not None or n == self.n_expert
                         else np.array([], np.int64))
                for e in first:
                    self._load(le.layer, int(e), self._free_slot(le.layer))
        self.moves = 0  # the initial fill is not a move

    def resident(self, layer: int) -> np.ndarray:
        """i32[n_expert]: each expert's VRAM slot in `layer`, -1 when it runs on the CPU."""
        return self.slot_of.get(layer, np.full(self.n_expert, -1, np.int32))

    def stack(self, layer: int, name: str):
        return self.stacks[layer, name]

    def fill_free(self, layer: int, ids: np.ndarray) -> None:
        """Before the layer's step: selected experts ids i32[n_tok, k] go into free slots (first
        use, no eviction), so that they run on the device in this very step."""
        held = self.expert_in.get(layer)
        if held is None or not (held < 0).any():
            return
        for e in np.unique(ids[self.slot_of[layer][ids] < 0]):
            slot = self._free_slot(layer)
            if slot < 0:
                return
            self._load(layer, int(e), slot)

    def update(self, layer: int, ids: np.ndarray) -> None:
        """After the layer's step: score the selections ids i32[n_tok, k], then promote."""
        if layer not in self.policies:
            return
        pol, slot_of, held = self.policies[layer], self.slot_of[layer], self.expert_in[layer]
        pol.update(ids)
        if held.size == 0:
            return
        missing = np.unique(ids[slot_of[ids] < 0])
        for e in missing[np.argsort(-pol.score[missing], kind="stable")][:MAX_MOVES]:
            slot = self._free_slot(layer)
            if slot < 0:
                worst = int(np.argmin(pol.score[held]))
                if pol.score[e] <= pol.score[held[worst]]:
                    break
                slot_of[held[worst]] = -1
                slot = worst
            self._load(layer, int(e), slot)
            self.moves += 1

    def _free_slot(self, layer: int) -> int:
        free = np.flatnonzero(self.expert_in[layer] < 0)
        return int(free[0]) if free.size else -1

    def _load(self, layer: int, e: int, slot: int) -> None:
        for (il, name), dev in self.stacks.items():
            if il == layer:
                r = self.rows[il, name]
                dev[slot * r:(slot + 1) * r].copy_to_device(np.ascontiguousarray(self.src[il, name][e]))
        self.slot_of[layer][e] = slot
        self.expert_in[layer][slot] = e

    def nbytes(self) -> int:
        return sum(int(d.size) for d in self.stacks.values())

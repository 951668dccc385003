"""The VRAM expert slots: which experts of each MoE layer live on the device.

Each layer gets the slots the GPU plan gives it, one device buffer per expert tensor
(u8[slots * rows, row_bytes], GGUF rows as stored). Filling and eviction follow the
RAM tier's policies (localmoe.planner.policy, LFU with decay by default): an expert is
loaded into a free slot when first selected (before the step, so it runs there at once;
the initial fill, not counted as a move), and a selected expert whose score beats
the lowest-scoring resident one replaces it, at most MAX_MOVES per layer and step.
A profile (--expert-profile) seeds the scores and the first residents.

First-use fills copy on the compute stream (the step needs them at once). Evictions
happen after the layer's step and are asynchronous: the expert's rows go from the file
mapping into a ring of pinned host buffers, then to the slot on the tier's copy stream,
which first waits for an event recorded on the compute stream after the layer's kernels
(the old expert's last readers); the layer's next step makes the compute stream wait for
the copy's event (`ready`) before its kernels. The host waits only when it reuses a
pinned buffer whose copy is still in flight.
"""
from __future__ import annotations

import numpy as np

from localmoe.planner.policy import make_policy

MAX_MOVES = 2  # per layer and step: bounds the host-to-device traffic of one token
N_STAGING = 4  # pinned host buffers in the ring (each the largest expert tensor)


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
        self.cuda = cuda
        self.copy_stream = cuda.stream()
        self.pending = {}   # layer -> event recorded on the copy stream after its moves
        self._staging = []  # ring of (pinned u8[max tensor bytes], event of its last copy or None)
        self._next = 0
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

    def ready(self, layer: int, stream) -> None:
        """Before the layer's step: `stream` waits (on the device) for the layer's pending moves."""
        ev = self.pending.pop(layer, None)
        if ev is not None:
            ev.wait(stream)

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

    def update(self, layer: int, ids: np.ndarray, stream=0) -> None:
        """After the layer's step, whose kernels are queued on `stream`: score the selections
        ids i32[n_tok, k], then promote (asynchronously, see the module notes)."""
        if layer not in self.policies:
            return
        pol, slot_of, held = self.policies[layer], self.slot_of[layer], self.expert_in[layer]
        pol.update(ids)
        if held.size == 0:
            return
        missing = np.unique(ids[slot_of[ids] < 0])
        after_step = None
        for e in missing[np.argsort(-pol.score[missing], kind="stable")][:MAX_MOVES]:
            slot = self._free_slot(layer)
            if slot < 0:
                worst = int(np.argmin(pol.score[held]))
                if pol.score[e] <= pol.score[held[worst]]:
                    break
                slot_of[held[worst]] = -1
                slot = worst
            if after_step is None:
                after_step = self.cuda.event()
                after_step.record(stream)
                after_step.wait(self.copy_stream)
            self._load(layer, int(e), slot, self.copy_stream)
            self.moves += 1
        if after_step is not None:
            done = self.cuda.event()
            done.record(self.copy_stream)
            self.pending[layer] = done

    def _free_slot(self, layer: int) -> int:
        free = np.flatnonzero(self.expert_in[layer] < 0)
        return int(free[0]) if free.size else -1

    def _load(self, layer: int, e: int, slot: int, stream=None) -> None:
        """Expert e's rows into VRAM slot `slot`: synchronously (stream None), or through a
        pinned buffer on `stream`."""
        for (il, name), dev in self.stacks.items():
            if il == layer:
                r = self.rows[il, name]
                src = self.src[il, name][e]
                if stream is None:
                    dev[slot * r:(slot + 1) * r].copy_to_device(np.ascontiguousarray(src))
                else:
                    entry = self._stage(src)
                    dev[slot * r:(slot + 1) * r].copy_to_device(entry[0][:src.nbytes].reshape(src.shape),
                                                                stream=stream)
                    entry[1] = self.cuda.event()  # the pinned buffer is free again once this fires
                    entry[1].record(stream)
        self.slot_of[layer][e] = slot
        self.expert_in[layer][slot] = e

    def _stage(self, src: np.ndarray) -> list:
        """The next [pinned buffer, event] of the ring holding src's bytes (after waiting for the
        buffer's last copy); the caller queues the copy and sets the event."""
        if not self._staging:
            size = max(a[0].nbytes for a in self.src.values())
            self._staging = [[self.cuda.pinned_array(size, np.uint8), None] for _ in range(N_STAGING)]
        entry = self._staging[self._next]
        self._next = (self._next + 1) % len(self._staging)
        if entry[1] is not None:
            entry[1].synchronize()
        np.copyto(entry[0][:src.nbytes].reshape(src.shape), src)
        return entry

    def nbytes(self) -> int:
        return sum(int(d.size) for d in self.stacks.values())

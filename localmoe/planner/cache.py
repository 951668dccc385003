"""Expert slots in one tier buffer: key (layer, e) -> slot. The owning store's
lock guards every method; reads into a slot happen outside it while the slot
is marked `loading`, which keeps it from being chosen as a victim."""
from __future__ import annotations

import numpy as np

from localmoe.weights import Linear

from .plan import LayerExperts


class SlotCache:
    def __init__(self, tier, n_slots: int, slot_bytes: int, fifo: bool = False):
        self.fifo = fifo  # evict in load order (the shared pool) instead of by the layer's policy
        self.buf = tier.allocate(n_slots, slot_bytes)  # u8[n_slots, slot_bytes]
        self.keys: list[tuple[int, int] | None] = [None] * n_slots
        self.where: dict[tuple[int, int], int] = {}
        self.loading = np.zeros(n_slots, bool)
        self.seq = np.zeros(n_slots, np.int64)  # load order: the shared pool evicts the oldest
        self._n_loads = 0
        self._views: dict[tuple[int, int], dict[str, Linear]] = {}

    def victim(self, score, protect) -> int | None:
        """An empty slot, else the slot whose key has the lowest score(key, slot);
        never a loading slot or a key in `protect`. None if every slot is taken."""
        best, best_score = None, None
        for slot, key in enumerate(self.keys):
            if key is None:
                return slot
            if self.loading[slot] or key in protect:
                continue
            s = score(key, slot)
            if best is None or s < best_score:
                best, best_score = slot, s
        return best

    def assign(self, slot: int, key) -> None:
        """Slot now belongs to key, its bytes still to be read."""
        old = self.keys[slot]
        if old is not None:
            del self.where[old]
        self.keys[slot], self.where[key] = key, slot
        self.loading[slot] = True
        self._n_loads += 1
        self.seq[slot] = self._n_loads

    def forget(self, slot: int) -> None:
        """A read failed: the slot is empty again."""
        del self.where[self.keys[slot]]
        self.keys[slot] = None
        self.loading[slot] = False

    def views(self, slot: int, le: LayerExperts) -> dict[str, Linear]:
        """Linear views over the slot, stacks in `le` order, built once per (slot, layer)."""
        v = self._views.get((slot, le.layer))
        if v is None:
            v, off = {}, 0
            for s in le.stacks:
                v[s.name] = Linear(f"blk.{le.layer}.{s.name}[slot {slot}]", s.qtype, s.shape[1:],
                                   self.buf[slot, off:off + s.expert_bytes])
                off += s.expert_bytes
            self._views[slot, le.layer] = v
        return v

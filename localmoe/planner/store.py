"""OffloadedExpertStore: a budgeted expert cache in front of the GGUF file.

Each MoE layer owns `plan.slots[l]` slots with its own eviction policy (a
global LRU would evict exactly the layer needed next, since decode visits the
layers in order); layers with no slots stream through a shared FIFO pool.
A slot in use by the compute (`_current`) or being read is never evicted.
"""
from __future__ import annotations

import threading

import numpy as np

from localmoe.experts import ExpertStore

from .cache import SlotCache
from .policy import make_policy
from .prefetch import Prefetcher, prediction_hits, prefetch_order
from .tiers import RamTier

_PENDING = 1e300  # score bonus: experts this layer still needs are evicted last


class OffloadedExpertStore(ExpertStore):
    def __init__(self, stacks, n_layer, n_expert, *, plan, reader, policy="lfu", routers=None,
                 profile=None, prefetch=True, tier=None):
        super().__init__(stacks, n_layer, n_expert)
        tier = tier or RamTier()
        self.plan, self.reader, self.policy_name = plan, reader, policy
        self.layout = {le.layer: le for le in plan.fp.layers}
        self.policies = {il: make_policy(policy, n_expert) for il in self.layout}
        shared = SlotCache(tier, plan.shared_slots, plan.fp.max_expert_bytes, fifo=True) if plan.shared_slots else None
        self.caches = {le.layer: SlotCache(tier, plan.slots[le.layer], le.expert_bytes)
                       if plan.slots[le.layer] else shared for le in plan.fp.layers}
        self.routers = routers or {}
        self._cond = threading.Condition()
        self._current = None               # (layer, e) the compute is using
        self._cur_views = None
        self._pending = (-1, set())        # (layer, experts selected there and not yet computed)
        self._pred: dict[int, np.ndarray] = {}
        self._tick = 0                     # blocks started; stale prefetch jobs are dropped
        self._k = plan.fp.n_expert_used    # experts per token, as last routed (Model.set_expert_used)
        z = lambda: np.zeros(n_layer, np.int64)  # noqa: E731
        self.selections, self.demand_loads, self.prefetch_loads = z(), z(), z()
        self.pred_correct, self.pred_total = z(), z()
        self.bytes_read = 0                # expert bytes read from the file
        if profile is not None:
            self.warm_start(profile)
        self.prefetcher = Prefetcher(self._prefetch) if prefetch and self.routers else None

    # --- compute side ----------------------------------------------------------

    def resident_stack(self, layer, name):
        return None  # experts come and go: only `expert` may hand them out

    def expert(self, layer, name, e):
        key = (layer, int(e))
        if key != self._current:
            self._cur_views = self._fetch(key)
        return self._cur_views[name]

    def note_selected(self, layer, expert_ids):
        super().note_selected(layer, expert_ids)
        if layer not in self.layout:
            return
        uniq = np.unique(expert_ids)
        self._k = expert_ids.shape[1]
        with self._cond:
            self.policies[layer].update(expert_ids)
            self._pending = (layer, set(uniq.tolist()))
            self.selections[layer] += uniq.size
        pred = self._pred.pop(layer, None)
        if pred is not None and pred.shape == expert_ids.shape:
            self.pred_correct[layer] += prediction_hits(pred, expert_ids)
            self.pred_total[layer] += expert_ids.size

    def before_block(self, layer, x):
        self._tick += 1
        nxt = layer + 1
        router = self.routers.get(nxt)
        if router is None:
            return
        pred = self._pred[nxt] = router(x, self._k)
        n_slots = self.plan.slots[nxt]
        if self.prefetcher is not None and 0 < n_slots < self.plan.fp.n_expert:
            self.prefetcher.submit((self._tick, nxt, prefetch_order(pred, n_slots)))

    # --- loading ---------------------------------------------------------------

    def _fetch(self, key):
        """Views of key's slot, read from disk first on a miss (blocks the compute)."""
        layer, e = key
        cache = self.caches[layer]
        with self._cond:
            self._current = key
            if self._pending[0] == layer:
                self._pending[1].discard(e)
            while True:
                slot = cache.where.get(key)
                if slot is not None:
                    if not cache.loading[slot]:
                        return cache.views(slot, self.layout[layer])
                    self._cond.wait()  # the prefetcher is reading it
                    continue
                slot = cache.victim(self._scorer(cache), {key})
                if slot is not None:
                    break
                self._cond.wait()  # every slot is being read
            cache.assign(slot, key)
            self.demand_loads[layer] += 1
        self._read(cache, slot, key)
        return cache.views(slot, self.layout[layer])

    def _prefetch(self, job):
        tick, layer, experts = job
        cache, keep = self.caches[layer], set()
        for e in experts:
            key = (layer, e)
            keep.add(key)
            with self._cond:
                if self._tick - tick > 1:  # the compute is past that layer already
                    return
                if key in cache.where:
                    continue
                protect = keep | {self._current} | {(self._pending[0], x) for x in self._pending[1]}
                slot = cache.victim(self._scorer(cache), protect)
                if slot is None:
                    return
                cache.assign(slot, key)
                self.prefetch_loads[layer] += 1
            self._read(cache, slot, key)

    def _read(self, cache, slot, key):
        layer, e = key
        try:
            off = 0
            for s in self.layout[layer].stacks:
                self.reader.read_into(cache.buf[slot, off:off + s.expert_bytes], s.offset + e * s.expert_bytes)
                off += s.expert_bytes
        except BaseException:
            with self._cond:
                cache.forget(slot)
                self._cond.notify_all()
            raise
        with self._cond:
            cache.loading[slot] = False
            self.bytes_read += self.layout[layer].expert_bytes
            self._cond.notify_all()

    def _scorer(self, cache):
        """score(key, slot) for cache.victim: the layer policy's, or load order in the shared pool."""
        pl, pending = self._pending

        def score(key, slot):
            base = float(cache.seq[slot]) if cache.fifo else self.policies[key[0]].score[key[1]]
            return base + (_PENDING if key[0] == pl and key[1] in pending else 0.0)
        return score

    def warm_start(self, counts: np.ndarray) -> None:
        """Seed the policies with a saved profile and read each layer's most used experts."""
        for il, le in self.layout.items():
            self.policies[il].seed(counts[il])
            n = self.plan.slots[il]
            for e in np.argsort(-counts[il], kind="stable")[:n]:
                if counts[il, e] == 0:
                    break
                cache = self.caches[il]
                with self._cond:
                    slot = cache.victim(self._scorer(cache), set())
                    cache.assign(slot, (il, int(e)))
                self._read(cache, slot, (il, int(e)))

    # --- reporting -------------------------------------------------------------

    def stats(self):
        sel, dem = int(self.selections.sum()), int(self.demand_loads.sum())
        pt = int(self.pred_total.sum())
        per_layer = [{"layer": il, "slots": self.plan.slots[il], "selections": int(self.selections[il]),
                      "demand_loads": int(self.demand_loads[il]), "prefetch_loads": int(self.prefetch_loads[il]),
                      "predicted_correct": int(self.pred_correct[il]), "predicted_total": int(self.pred_total[il])}
                     for il in self.layout]
        return {**super().stats(), "cache": {
            "policy": self.policy_name, "budget_bytes": self.plan.budget,
            "selections": sel, "demand_loads": dem, "prefetch_loads": int(self.prefetch_loads.sum()),
            "hit_rate": 1.0 - dem / sel if sel else None,
            "predicted_correct": int(self.pred_correct.sum()), "predicted_total": pt,
            "prefetch_accuracy": int(self.pred_correct.sum()) / pt if pt else None,
            "bytes_read": self.bytes_read, "layers": per_layer}}

    def reset_stats(self):
        super().reset_stats()
        for a in (self.selections, self.demand_loads, self.prefetch_loads, self.pred_correct, self.pred_total):
            a[:] = 0
        self.bytes_read = 0

    def close(self):
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.reader.close()

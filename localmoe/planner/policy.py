"""Which cached expert of a layer to evict: a score per expert, the lowest goes first.

Scores cover every expert of the layer, cached or not, so a policy remembers
an expert's history across evictions (LFU's frequency survives a reload).
"""
from __future__ import annotations

import numpy as np

from localmoe.errors import LocalMoEError

DEFAULT_DECAY = 0.95  # LFU: weight of a selection halves after ~14 steps of this layer


class Policy:
    def __init__(self, n_expert: int):
        self.score = np.zeros(n_expert, np.float64)  # f64[n_expert]: higher = keep

    def update(self, ids: np.ndarray) -> None:
        """ids i32[...]: this step's selections in the layer."""
        raise NotImplementedError

    def seed(self, counts: np.ndarray) -> None:
        """Warm start from a saved profile's i64[n_expert] hit counts."""
        raise NotImplementedError


class LRU(Policy):
    """Least recently used: the score is the step of the last selection."""

    def __init__(self, n_expert: int):
        super().__init__(n_expert)
        self.clock = 0

    def update(self, ids):
        self.clock += 1
        self.score[np.asarray(ids).reshape(-1)] = self.clock

    def seed(self, counts):
        # most frequent = most recent, all before the first real step
        ranks = np.argsort(np.argsort(counts, kind="stable"), kind="stable")
        self.score[:] = ranks - len(counts)


class LFUDecay(Policy):
    """Least frequently used, each step multiplying old counts by `decay` so
    yesterday's favourites age out."""

    def __init__(self, n_expert: int, decay: float = DEFAULT_DECAY):
        super().__init__(n_expert)
        self.decay = decay

    def update(self, ids):
        self.score *= self.decay
        np.add.at(self.score, np.asarray(ids).reshape(-1), 1.0)

    def seed(self, counts):
        # scale so the top expert starts as if it had been picked at every step
        c = np.asarray(counts, np.float64)
        if c.max() > 0:
            self.score[:] = c / c.max() / (1.0 - self.decay)


POLICIES = {"lru": LRU, "lfu": LFUDecay}


def make_policy(name: str, n_expert: int) -> Policy:
    try:
        return POLICIES[name](n_expert)
    except KeyError:
        raise LocalMoEError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}") from None

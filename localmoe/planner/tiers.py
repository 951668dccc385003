"""Storage tiers for expert slots. RAM is the only one today; a GPU tier
(`--gpu-budget`, a later issue) implements the same interface and hands out
device buffers, with its own kernels reading them."""
from __future__ import annotations

import abc

import numpy as np


class Tier(abc.ABC):
    name: str

    @abc.abstractmethod
    def allocate(self, n_slots: int, slot_bytes: int):
        """Storage for n_slots experts of slot_bytes each, indexable as buf[slot] -> u8[slot_bytes]."""


class RamTier(Tier):
    """Anonymous memory: pages belong to the process, not to the page cache."""

    name = "ram"

    def allocate(self, n_slots, slot_bytes):
        return np.empty((n_slots, slot_bytes), np.uint8)  # u8[n_slots, slot_bytes]

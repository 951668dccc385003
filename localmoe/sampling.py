"""Token sampling and stop strings, with llama-cpp-python's semantics.

The chain is the one llama-cpp-python builds by default:
    repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
top-p and min-p therefore see probabilities at temperature 1, and the
temperature only reshapes what survives. temperature <= 0 is greedy.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .errors import LocalMoEError


class SamplingError(LocalMoEError, ValueError):
    """A sampling parameter is out of range."""


def _check(name: str, value: float, ok: bool, rule: str) -> None:
    if not ok or (isinstance(value, float) and math.isnan(value)):
        raise SamplingError(f"{name}={value!r}: must be {rule}")


class Sampler:
    def __init__(self, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                 seed: int | None = None):
        _check("temperature", temperature, math.isfinite(temperature), "a finite number (<= 0 is greedy)")
        _check("top_k", top_k, int(top_k) == top_k, "an integer (<= 0 disables it)")
        _check("top_p", top_p, 0.0 < top_p <= 1.0, "in (0, 1] (1 disables it)")
        _check("min_p", min_p, 0.0 <= min_p <= 1.0, "in [0, 1] (0 disables it)")
        _check("repeat_penalty", repeat_penalty, 0.0 < repeat_penalty < math.inf, "a positive number (1 disables it)")
        _check("repeat_last_n", repeat_last_n, int(repeat_last_n) == repeat_last_n and repeat_last_n >= 0,
               "a non-negative integer")
        self.temperature, self.top_k, self.top_p, self.min_p = float(temperature), int(top_k), float(top_p), float(min_p)
        self.repeat_penalty, self.repeat_last_n = float(repeat_penalty), int(repeat_last_n)
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """llama.cpp's repeat penalty: divide positive logits, multiply negative ones."""
        if self.repeat_penalty == 1.0 or self.repeat_last_n == 0 or not len(history):
            return logits
        ids = np.unique(np.asarray(history[-self.repeat_last_n:], dtype=np.int64))
        logits = logits.copy()
        v = logits[ids]
        logits[ids] = np.where(v <= 0, v * self.repeat_penalty, v / self.repeat_penalty)
        return logits

    def candidates(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) after the whole chain, most likely first."""
        logits = np.asarray(logits, dtype=np.float32)
        # NaN never wins; +inf is a certainty, so only the +inf tokens remain.
        logits = np.where(np.isnan(logits), -np.inf, logits)
        logits = self.penalize(logits, history)
        n = logits.size
        k = n if self.top_k <= 0 else min(self.top_k, n)
        ids = np.argpartition(-logits, k - 1)[:k] if k < n else np.arange(n)
        # stable sort on (-logit, id) so equal logits keep the lowest id first
        ids = ids[np.lexsort((ids, -logits[ids]))]
        lg = logits[ids].astype(np.float64)
        if np.isposinf(lg[0]):
            keep = np.isposinf(lg)
            return ids[keep], np.full(int(keep.sum()), 1.0 / keep.sum())
        p = np.exp(lg - lg[0])
        p /= p.sum()
        if self.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(p), self.top_p)) + 1  # first prefix reaching top_p
            ids, lg, p = ids[:cut], lg[:cut], p[:cut]
        if self.min_p > 0.0:
            keep = max(1, int(np.count_nonzero(p >= self.min_p * p[0])))
            ids, lg = ids[:keep], lg[:keep]
        t = max(self.temperature, 1e-30)
        p = np.exp((lg - lg[0]) / t)
        return ids, p / p.sum()

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        if self.greedy:
            lg = self.penalize(np.asarray(logits, dtype=np.float32), history)
            return int(np.argmax(np.where(np.isnan(lg), -np.inf, lg)))
        ids, p = self.candidates(logits, history)
        return int(ids[self.rng.choice(p.size, p=p)])


class StopStrings:
    """Cuts streamed text at the first stop string, holding back possible prefixes."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def _held(self, text: str) -> int:
        """Length of the longest suffix of text that starts some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self.pending + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending, self.stopped = "", True
            return text[: min(hits)], True
        keep = self._held(text)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

"""Token sampling and stop strings, with llama-cpp-python's semantics.

The chain is the one llama-cpp-python builds by default:
    repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
top-p and min-p therefore see probabilities at temperature 1, and the
temperature only reshapes what survives. temperature <= 0 is greedy; seed None or -1 draws a random seed.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .errors import LocalMoEError


class SamplingError(LocalMoEError, ValueError):
    """A sampling parameter is out of range."""


def _number(name: str, value) -> float:
    """value as a float; SamplingError for a non-number (bool, str, None...) or an int beyond float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SamplingError(f"{name}={value!r}: must be a number")
    try:
        return float(value)
    except OverflowError:
        raise SamplingError(f"{name}={value!r}: out of range") from None


def _check(name: str, value, ok, rule: str) -> None:
    x = _number(name, value)
    if math.isnan(x) or not ok(x):
        raise SamplingError(f"{name}={value!r}: must be {rule}")


def _integral(x: float) -> bool:
    return math.isfinite(x) and x == int(x)


def check_seed(seed) -> int | None:
    """A seed as Sampler takes it: None or -1 draw a random one (llama.cpp's LLAMA_DEFAULT_SEED),
    otherwise a non-negative integer."""
    if seed is None or (not isinstance(seed, bool) and isinstance(seed, (int, np.integer)) and seed == -1):
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SamplingError(f"seed={seed!r}: must be a non-negative integer, or -1 for a random seed")
    return int(seed)


class Sampler:
    def __init__(self, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                 seed: int | None = None):
        _check("temperature", temperature, math.isfinite, "a finite number (<= 0 is greedy)")
        _check("top_k", top_k, _integral, "an integer (<= 0 disables it)")
        _check("top_p", top_p, lambda x: 0.0 < x <= 1.0, "in (0, 1] (1 disables it)")
        _check("min_p", min_p, lambda x: 0.0 <= x <= 1.0, "in [0, 1] (0 disables it)")
        _check("repeat_penalty", repeat_penalty, lambda x: 0.0 < x < math.inf, "a positive number (1 disables it)")
        _check("repeat_last_n", repeat_last_n, lambda x: _integral(x) and x >= 0, "a non-negative integer")
        self.temperature, self.top_k, self.top_p, self.min_p = float(temperature), int(top_k), float(top_p), float(min_p)
        self.repeat_penalty, self.repeat_last_n = float(repeat_penalty), int(repeat_last_n)
        self.seed = seed  # as given (-1 stays -1, so a saved chat keeps "random")
        self._seed = check_seed(seed)
        self.reset()

    def reset(self) -> None:
        self.rng = np.random.default_rng(self._seed)

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
        from .tokenizer.text import clean_text
        self.stops = [clean_text(s) for s in stops if s]
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

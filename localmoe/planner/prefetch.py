"""Speculative prefetch ("Fast Inference of Mixture-of-Experts Language Models
with Offloading", Eliseev & Mazur 2023): while block l runs, layer l+1's router
applied to block l's input guesses l+1's experts, and a background thread reads
the missing ones. numba kernels and os.preadv release the GIL, so they overlap."""
from __future__ import annotations

import queue
import threading

import numpy as np

from localmoe.layers import rms_norm, sigmoid


class Router:
    """Layer l's expert choice applied to another hidden state: the top-k by the
    selection score (logits; sigmoid + bias where the model has exp_probs_b)."""

    def __init__(self, ffn_norm, gate_inp, bias, eps: float):
        self.ffn_norm, self.gate_inp, self.bias, self.eps = ffn_norm, gate_inp, bias, eps

    def __call__(self, x: np.ndarray, k: int) -> np.ndarray:  # x f32[n_tok, n_embd] -> i32[n_tok, k]
        score = self.gate_inp(rms_norm(x, self.ffn_norm, self.eps))
        if self.bias is not None:
            score = sigmoid(score) + self.bias
        return np.argsort(-score, axis=-1, kind="stable")[:, :k].astype(np.int32)


def prefetch_order(pred: np.ndarray, limit: int) -> list[int]:
    """Distinct experts of pred i32[n_tok, k], best-ranked slots first, at most `limit`."""
    order = pred.T.reshape(-1)  # slot 0 of every token, then slot 1, ...
    _, first = np.unique(order, return_index=True)
    return [int(order[i]) for i in np.sort(first)][:limit]


def prediction_hits(pred: np.ndarray, ids: np.ndarray) -> int:
    """How many of the actual picks ids i32[n_tok, k] were predicted (same token)."""
    return int(sum(np.intersect1d(p, a).size for p, a in zip(pred, ids)))


class Prefetcher:
    """One background thread running load(job) for each submitted job, in order."""

    def __init__(self, load):
        self._load = load
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="localmoe-prefetch", daemon=True)
        self._thread.start()
        self.error: BaseException | None = None

    def submit(self, job) -> None:
        if self.error is not None:
            raise self.error
        self._q.put(job)

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            try:
                self._load(job)
            except BaseException as e:  # surfaced on the next submit
                self.error = e

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

"""Routing on the device: softmax or sigmoid over a token's expert logits, then the top k
(ties to the lower expert id, as a stable argsort), optionally renormalised and scaled,
as localmoe.arch.base.route_topk. One thread per token: n_expert is small."""
from __future__ import annotations

import math

from numba import cuda, float32, float64, int32

from .ops import NT, _flat_grid

SOFTMAX, SIGMOID = 0, 1


@cuda.jit
def _route(ids, wts, probs, logits, gating, norm, scale):
    # ids i32[n_tok, k], wts f32[n_tok, k]; probs/logits f32[n_tok, n_expert]
    n_exp, k = logits.shape[1], ids.shape[1]
    for t in range(cuda.grid(1), logits.shape[0], cuda.gridsize(1)):
        if gating == SOFTMAX:
            m = float32(-math.inf)
            for e in range(n_exp):
                m = max(m, logits[t, e])
            z = float64(0.0)
            for e in range(n_exp):
                v = math.exp(logits[t, e] - m)
                probs[t, e] = v
                z += v
            inv = float32(1.0 / z)
            for e in range(n_exp):
                probs[t, e] *= inv
        else:
            for e in range(n_exp):
                probs[t, e] = float32(1.0) / (float32(1.0) + math.exp(-logits[t, e]))
        prev_p, prev_e = float32(math.inf), int32(-1)
        total = float64(0.0)
        for s in range(k):  # the next pick: the largest (p, -e) below the previous one
            best_p, best_e = float32(-math.inf), int32(-1)
            for e in range(n_exp):
                v = probs[t, e]
                if (v < prev_p or (v == prev_p and e > prev_e)) and (best_e < 0 or v > best_p):
                    best_p, best_e = v, e
            ids[t, s], wts[t, s] = best_e, best_p
            total += best_p
            prev_p, prev_e = best_p, best_e
        div = max(float32(total), float32(6.103515625e-5)) if norm else float32(1.0)
        for s in range(k):
            v = wts[t, s] / div
            wts[t, s] = v * scale if scale != 0.0 and scale != 1.0 else v


def route(ids, wts, probs, logits, gating: str, norm: bool, scale: float, stream=0) -> None:
    """ids i32[n_tok, k] and weights f32[n_tok, k] of the top-k experts for router logits
    f32[n_tok, n_expert]; probs f32[n_tok, n_expert] scratch. gating "softmax" or "sigmoid"."""
    g = SOFTMAX if gating == "softmax" else SIGMOID
    _route[_flat_grid(logits.shape[0]), NT, stream](ids, wts, probs, logits, int32(g), bool(norm), float32(scale))

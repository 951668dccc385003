"""Routing on the device: softmax or sigmoid over a token's expert logits, then the top k
(ties to the lower expert id, as a stable argsort), optionally renormalised and scaled,
as localmoe.arch.base.route_topk. DeepSeek-V3's selection (localmoe.arch.deepseek2.route)
too: a selection bias (exp_probs_b) added to the probabilities and group-limited top-k
(each group scored by its two best biased probabilities, the n_group_used best groups
kept) decide which experts run, their weights stay the unbiased probabilities.
One thread per token: n_expert is small."""
from __future__ import annotations

import math

from numba import cuda, float32, float64, int32

from .ops import NT, _flat_grid

SOFTMAX, SIGMOID = 0, 1


@cuda.jit(device=True, inline=True)
def _before(v, e, prev_v, prev_e):  # (v, -e) below (prev_v, -prev_e): the order of a stable descending sort
    return v < prev_v or (v == prev_v and e > prev_e)


@cuda.jit
def _route(ids, wts, probs, sel, gscore, logits, bias, gating, norm, scale, n_group_used):
    # ids i32[n_tok, k], wts f32[n_tok, k]; probs/sel/logits f32[n_tok, n_expert] (probs, sel: scratch);
    # gscore f32[n_tok, n_group] scratch (n_group <= 1: no groups); bias f32[n_expert] or f32[0]
    n_exp, k, n_group = logits.shape[1], ids.shape[1], gscore.shape[1]
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
        for e in range(n_exp):
            sel[t, e] = probs[t, e] + bias[e] if bias.shape[0] else probs[t, e]
        if n_group > 1:
            per = n_exp // n_group
            for g in range(n_group):  # a group's score: the sum of its two best
                b1, b2 = float32(-math.inf), float32(-math.inf)
                for e in range(g * per, (g + 1) * per):
                    v = sel[t, e]
                    if v > b1:
                        b1, b2 = v, b1
                    elif v > b2:
                        b2 = v
                gscore[t, g] = b1 + b2 if per > 1 else b1
            last_v, last_g = float32(math.inf), int32(-1)
            for s in range(n_group_used):  # the n_group_used-th best group: groups not below it stay
                best_v, best_g = float32(-math.inf), int32(-1)
                for g in range(n_group):
                    v = gscore[t, g]
                    if _before(v, g, last_v, last_g) and (best_g < 0 or v > best_v):
                        best_v, best_g = v, g
                last_v, last_g = best_v, best_g
            for g in range(n_group):
                if _before(gscore[t, g], g, last_v, last_g):
                    for e in range(g * per, (g + 1) * per):
                        sel[t, e] = float32(-math.inf)
        prev_p, prev_e = float32(math.inf), int32(-1)
        total = float64(0.0)
        for s in range(k):  # the next pick: the largest (sel, -e) below the previous one
            best_p, best_e = float32(-math.inf), int32(-1)
            for e in range(n_exp):
                v = sel[t, e]
                if _before(v, e, prev_p, prev_e) and (best_e < 0 or v > best_p):
                    best_p, best_e = v, e
            ids[t, s], wts[t, s] = best_e, probs[t, best_e]
            total += probs[t, best_e]
            prev_p, prev_e = best_p, best_e
        div = max(float32(total), float32(6.103515625e-5)) if norm else float32(1.0)
        for s in range(k):
            v = wts[t, s] / div
            wts[t, s] = v * scale if scale != 0.0 and scale != 1.0 else v


def route(ids, wts, scratch, logits, bias, gating: str, norm: bool, scale: float, n_group_used: int = 0,
          stream=0) -> None:
    """ids i32[n_tok, k] and weights f32[n_tok, k] of the top-k experts for router logits
    f32[n_tok, n_expert]. gating "softmax" or "sigmoid". scratch: (probs, sel) f32[n_tok, n_expert]
    and gscore f32[n_tok, n_group] (n_group 1: no group limit); bias f32[n_expert] or f32[0] (none)."""
    probs, sel, gscore = scratch
    g = SOFTMAX if gating == "softmax" else SIGMOID
    _route[_flat_grid(logits.shape[0]), NT, stream](ids, wts, probs, sel, gscore, logits, bias, int32(g), bool(norm),
                                                    float32(scale), int32(n_group_used))

"""The two study levers on the router, for every architecture (they act in `arch.base.Block`,
where every architecture's top-k selection passes on its way to `moe.moe_ffn`). Both are off by
default; off, the routing and the logits are bit-identical to llama.cpp's.

Expert masks (`Model.mask_experts`, `load(drop_experts=...)`): a layer's router may pick only its
surviving experts. A dropped expert's router logit is -inf, so softmax gating renormalises over the
survivors (the model as if the expert and its router row were removed) and sigmoid gating scores
it 0; its selection score (with DeepSeek-V3's exp_probs_b bias) is -inf as well. Group-limited
routing (DeepSeek-V3) scores a group by its survivors and takes further groups when the
n_group_used best hold fewer than k survivors, so all k picks are survivors (deepseek2._masked_groups).

Adaptive skipping (`min_expert_weight` W): after the architecture's own routing and weight
normalisation, picked experts whose weight is below W (times expert_weights_scale, so W compares
with the normalised weight) are not computed; the token's heaviest expert always runs. The survivors
keep their weights, not renormalised: the skipped term w * y is replaced by 0, an error of at most
W * |y|, and the model's output scale stays as trained; renormalising would instead stand the other
experts in for the skipped one, and archs that never renormalise (OLMoE, Qwen2-MoE, DeepSeek v1)
have no sum to restore. W -> 0 is then the unchanged model. On the shipped model (8 held-out
chunks of 256 tokens) keeping the weights gave the lower perplexity at W = 0.2, 0.3 and 0.4
(93.19 / 93.90 / 94.64 against 94.06 / 94.34 / 96.24 renormalised; 92.26 without skipping).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from localmoe.errors import LocalMoEError


def check_min_weight(w) -> float:
    """W as a float in [0, 1); None is 0 (off)."""
    if w is None:
        return 0.0
    if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) or \
            not (math.isfinite(w) and 0.0 <= w < 1.0):
        raise LocalMoEError(f"min_expert_weight must be a number in [0, 1), got {w!r}")
    return float(w)


def keep_arrays(keep: Mapping, n_layer: int, n_expert: int, moe_layers: list[int], k: int) -> dict[int, np.ndarray]:
    """{layer: surviving expert ids} -> {layer: bool[n_expert]}, every value checked; layers not
    named keep all their experts."""
    if not isinstance(keep, Mapping):
        raise LocalMoEError(f"an expert mask is a mapping {{layer: [expert ids to keep]}}, got {type(keep).__name__}")
    if not moe_layers:
        raise LocalMoEError("this model has no expert layers to mask")
    out = {}
    for il, ids in keep.items():
        if isinstance(il, bool) or not isinstance(il, (int, np.integer)) or il not in moe_layers:
            raise LocalMoEError(f"expert mask: layer {il!r} is not an expert layer of this model "
                                f"(have {moe_layers[0]}..{moe_layers[-1]})")
        try:
            a = np.asarray(list(ids))
        except TypeError:
            a = None
        if a is None or a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise LocalMoEError(f"expert mask: layer {il} needs a list of integer expert ids, got {ids!r}")
        if a.size == 0:
            raise LocalMoEError(f"expert mask: layer {il} keeps no experts (every expert dropped)")
        if a.min() < 0 or a.max() >= n_expert:
            raise LocalMoEError(f"expert mask: layer {il}: expert ids must be in 0..{n_expert - 1}, got {a.tolist()}")
        m = np.zeros(n_expert, bool)
        m[a] = True
        if m.sum() < k:
            raise LocalMoEError(f"expert mask: layer {il} keeps {int(m.sum())} expert(s), fewer than the {k} "
                                f"active per token: keep more or lower n_expert_used")
        out[int(il)] = m
    return out


def least_used(counts, fraction, moe_layers: list[int]) -> dict[int, list[int]]:
    """{layer: kept ids} dropping round(fraction x n_expert) experts of each expert layer, the least
    routed first by counts i[n_layer, n_expert] (ties: the lower id goes first)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)) or \
            not (math.isfinite(fraction) and 0.0 <= fraction < 1.0):
        raise LocalMoEError(f"drop_experts must be a fraction in [0, 1), got {fraction!r}")
    c = np.asarray(counts)
    n_expert = c.shape[1]
    n_drop = math.floor(fraction * n_expert + 0.5)
    if n_drop >= n_expert:
        raise LocalMoEError(f"dropping {fraction:g} of {n_expert} experts drops all of them")
    return {il: sorted(np.argsort(c[il], kind="stable")[n_drop:].tolist()) for il in moe_layers}


def run_mask(wts: np.ndarray, min_weight: float, scale: float) -> np.ndarray | None:
    """bool[n_tok, k]: which picked (token, slot) pairs are computed for weights f32[n_tok, k];
    None = all (W = 0, off)."""
    if not min_weight > 0.0:
        return None
    run = wts >= np.float32(min_weight * (scale if scale not in (0.0, 1.0) else 1.0))
    run[np.arange(wts.shape[0]), np.argmax(wts, axis=1)] = True  # the heaviest expert always runs
    return run

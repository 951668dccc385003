"""Expert FFN compute shared by every MoE architecture: only routed experts run.

Tokens are grouped by expert, so each selected expert's weights are read once
per batch (one matvec per matrix when decoding a single token). Per-slot
outputs are summed in slot order, like llama.cpp's ffn_moe_out.
"""
from __future__ import annotations

import numpy as np

from localmoe.layers import silu


def swiglu_ffn(x: np.ndarray, gate, up, down) -> np.ndarray:
    """down(silu(gate x) * up x). x f32[n_tok, n_embd]; gate/up/down: Linear; gate may be None."""
    u = up(x)
    return down(silu(u) if gate is None else silu(gate(x)) * u)


def moe_ffn(store, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Sum over slots of weights[t, s] * expert_{ids[t, s]}(x[t]).

    x f32[n_tok, n_embd]; ids i32[n_tok, k]; weights f32[n_tok, k] -> f32[n_tok, n_embd].
    """
    store.note_selected(layer, ids)
    n_tok, k = ids.shape
    has_gate = store.has(layer, "ffn_gate_exps")
    ys = np.empty((n_tok, k, x.shape[1]), np.float32)  # f32[n_tok, k, n_embd]: per-slot outputs
    for e in np.unique(ids):
        tok, slot = np.nonzero(ids == e)
        gate = store.expert(layer, "ffn_gate_exps", e) if has_gate else None
        y = swiglu_ffn(x[tok], gate, store.expert(layer, "ffn_up_exps", e),
                       store.expert(layer, "ffn_down_exps", e))
        ys[tok, slot] = y * weights[tok, slot, None]
    out = ys[:, 0].copy()
    for s in range(1, k):
        out += ys[:, s]
    return out

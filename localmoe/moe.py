"""Expert FFN compute shared by every MoE architecture: only routed experts run.

Tokens are grouped by expert, so each selected expert's weights are read once
per batch (one matvec per matrix when decoding a single token). Per-slot
outputs are summed in slot order, like llama.cpp's ffn_moe_out.
"""
from __future__ import annotations

import numpy as np

from localmoe.layers import silu
from localmoe.weights import Activation


def swiglu_ffn(x, gate, up, down) -> np.ndarray:
    """down(silu(gate x) * up x). x f32[n_tok, n_embd] or its Activation; gate/up/down: Linear; gate may be None."""
    x = x if isinstance(x, Activation) else Activation(x)  # gate and up share x's conversion
    u = up(x)
    return down(silu(u) if gate is None else silu(gate(x)) * u)


def moe_ffn(store, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
            run: np.ndarray | None = None) -> np.ndarray:
    """Sum over slots of weights[t, s] * expert_{ids[t, s]}(x[t]).

    x f32[n_tok, n_embd]; ids i32[n_tok, k]; weights f32[n_tok, k] -> f32[n_tok, n_embd].
    run bool[n_tok, k]: only these pairs are computed (localmoe.routing's levers; None: all), a
    skipped slot adds nothing. x is converted for the expert kernels once, not once per expert.
    """
    store.note_selected(layer, ids)
    n_tok, k = ids.shape
    has_gate = store.has(layer, "ffn_gate_exps")
    xa = Activation(x)

    def expert_y(e, xe):  # f32[n_tok(e), n_embd]
        gate = store.expert(layer, "ffn_gate_exps", e) if has_gate else None
        return swiglu_ffn(xe, gate, store.expert(layer, "ffn_up_exps", e), store.expert(layer, "ffn_down_exps", e))

    if n_tok == 1:  # decode: slots in order, no grouping
        sel, wts = (ids[0], weights[0]) if run is None else (ids[0][run[0]], weights[0][run[0]])
        stacks = _resident_stacks(store, layer, has_gate)
        if stacks is not None:
            return _decode_resident(xa, *stacks, sel.astype(np.int64), wts)
        out = expert_y(sel[0], xa) * wts[0]
        for s in range(1, sel.size):
            out += expert_y(sel[s], xa) * wts[s]
        return out
    picked = ids if run is None else np.where(run, ids, -1)
    # f32[n_tok, k, n_embd]: per-slot outputs (a skipped slot's are 0, and x + 0 is x)
    ys = (np.empty if run is None else np.zeros)((n_tok, k, x.shape[1]), np.float32)
    for e in np.unique(picked):
        if e < 0:
            continue
        tok, slot = np.nonzero(picked == e)
        ys[tok, slot] = expert_y(e, xa.take_rows(tok)) * weights[tok, slot, None]
    out = ys[:, 0].copy()
    for s in range(1, k):
        out += ys[:, s]
    return out


def _resident_stacks(store, layer: int, has_gate: bool):
    """(gate or None, up, down) stacks (n_expert, out, in) when the store holds every expert in
    memory (ExpertStore.resident_stack) and gate and up share a type; else None."""
    up, down = store.resident_stack(layer, "ffn_up_exps"), store.resident_stack(layer, "ffn_down_exps")
    gate = store.resident_stack(layer, "ffn_gate_exps") if has_gate else None
    if up is None or down is None or (has_gate and gate is None):
        return None
    return None if gate is not None and gate.qtype != up.qtype else (gate, up, down)


def _decode_resident(xa: Activation, gate, up, down, sel: np.ndarray, wts: np.ndarray) -> np.ndarray:
    """One token through its k experts sel i64[k] with weights wts f32[k] -> f32[1, n_embd]: all
    gate/up matvecs in one call, all down matvecs in another (QuantType.matvec_experts_into),
    with the same float steps as swiglu_ffn per expert."""
    k = sel.size
    mats = (up,) if gate is None else (gate, up)
    gu = np.empty((len(mats), k, up.n_out), np.float32)  # f32[(gate,) up, k, n_ff]
    up.qt.matvec_experts_into(gu, xa.prepared(up.qt), tuple(m.rows for m in mats), sel, np.zeros(k, np.int64))
    h = silu(gu[0]) if gate is None else silu(gu[0]) * gu[1]  # f32[k, n_ff]
    y = np.empty((1, k, down.n_out), np.float32)  # f32[1, k, n_embd]: each expert's output
    down.qt.matvec_experts_into(y, down.qt.prepare(h), (down.rows,), sel, np.arange(k, dtype=np.int64))
    out = y[0, :1] * wts[0]
    for s in range(1, k):
        out += y[0, s:s + 1] * wts[s]
    return out

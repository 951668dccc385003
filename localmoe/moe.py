"""Expert FFN compute shared by every MoE architecture: only routed experts run.

Tokens are grouped by expert, so each selected expert's weights are read once
per batch (one matvec per matrix when decoding a single token). Per-slot
outputs are summed in slot order, like llama.cpp's ffn_moe_out.
"""
from __future__ import annotations

import numpy as np

from localmoe.layers import silu
from localmoe.weights import FLOAT_TYPES, Activation


def swiglu_ffn(x, gate, up, down) -> np.ndarray:
    """down(silu(gate x) * up x). x f32[n_tok, n_embd] or its Activation; gate/up/down: Linear; gate may be None."""
    x = x if isinstance(x, Activation) else Activation(x)  # gate and up share x's conversion
    u = up(x)
    return down(Activation(silu(u) if gate is None else silu(gate(x)) * u, seq=x.seq))


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

    if n_tok == 1 and run is not None:  # decode: only the slots that run, in order
        ids, weights, k = ids[:, run[0]], weights[:, run[0]], int(run[0].sum())
    stacks = (_resident_stacks(store, layer, has_gate)
              if n_tok == 1 or (run is None and _few_per_expert(ids)) else None)
    if stacks is not None and (n_tok == 1 or stacks[1].qtype not in FLOAT_TYPES):
        return _pairs_resident(xa, *stacks, ids.astype(np.int64), weights)
    if n_tok == 1:  # decode: slots in order, no grouping
        out = expert_y(ids[0, 0], xa) * weights[0, 0]
        for s in range(1, k):
            out += expert_y(ids[0, s], xa) * weights[0, s]
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


PAIRS_PER_EXPERT = 8  # up to this many tokens per selected expert (mean), one fused call per matrix kind


def _few_per_expert(ids: np.ndarray) -> bool:
    """Few tokens per selected expert: one fused call per matrix kind over every (token, slot)
    pair, grouped by expert, beats three calls per expert (each a parallel region); with many
    tokens an expert's matmul reuses its rows better."""
    return ids.size <= PAIRS_PER_EXPERT * np.unique(ids).size


def _pairs_resident(xa: Activation, gate, up, down, ids: np.ndarray, wts: np.ndarray) -> np.ndarray:
    """Each token through its k experts, ids i64[n_tok, k] with weights wts f32[n_tok, k] ->
    f32[n_tok, n_embd]: all gate/up matvecs in one call, all down matvecs in another
    (QuantType.matvec_experts_into, llama.cpp's mul_mat_id shape), with the same float steps
    as swiglu_ffn per expert. Quantized kernels give a row the same bits as a matmul does, so
    this equals the grouped path; float types differ between one row and many (see
    weights.ROW_SEQ) and take it for one token only."""
    n_tok, k = ids.shape
    n = ids.size
    # pairs grouped by expert: a group goes through each of its expert's rows together
    order = np.argsort(ids.reshape(-1), kind="stable") if n_tok > 1 else np.arange(n)
    sel, tok = ids.reshape(-1)[order], order // k
    gstart = np.flatnonzero(np.r_[True, sel[1:] != sel[:-1], True]) if n_tok > 1 else None
    mats = (up,) if gate is None else (gate, up)
    gu = np.empty((len(mats), n, up.n_out), np.float32)  # f32[(gate,) up, n pairs, n_ff]
    up.qt.matvec_experts_into(gu, xa.prepared(up.qt), tuple(m.rows for m in mats), sel, tok, gstart)
    h = silu(gu[0]) if gate is None else silu(gu[0]) * gu[1]  # f32[n pairs, n_ff]
    y = np.empty((1, n, down.n_out), np.float32)  # f32[1, n pairs, n_embd]: each pair's output
    down.qt.matvec_experts_into(y, down.qt.prepare(h), (down.rows,), sel, np.arange(n, dtype=np.int64), gstart)
    y = y[0, np.argsort(order)].reshape(n_tok, k, down.n_out)
    out = y[:, 0] * wts[:, :1]
    for s in range(1, k):
        out += y[:, s] * wts[:, s:s + 1]
    return out

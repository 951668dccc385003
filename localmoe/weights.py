"""Weight tensors as raw GGUF bytes + qtype; all math goes through localmoe.quant.

A `Linear` is a 2-D weight (rows, cols) or a stack of them (n, rows, cols),
numpy order (GGUF ne reversed). Model code calls it (or `matmul_into`) on x or on
an `Activation` (x converted once for several weights) and never looks at the block
bytes. `LayerWeights` exposes a block's tensors under their GGUF names (`blk.3.attn_q.weight` -> `layer.attn_q`, its
`.bias` -> `layer.attn_q.bias`), so loading needs no mapping tables.
"""
from __future__ import annotations

import math
import re
from contextvars import ContextVar
from types import SimpleNamespace

import numpy as np
from gguf import GGMLQuantizationType as T

from localmoe.errors import GGUFFormatError, LocalMoEError, UnsupportedError
from localmoe.quant import QuantType, quant_type


# Model.forward_seqs runs several sequences as one batch and sets this to each row's sequence
# i32[n_tok]. llama.cpp's CPU kernel for F32/F16/BF16 weights depends on the row count (a
# one-token dot product, or sgemm for a batch), so those weights run each sequence's rows on
# their own, as the sequence would alone; quantized kernels are row-wise and need no split.
ROW_SEQ: ContextVar[np.ndarray | None] = ContextVar("ROW_SEQ", default=None)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)


def row_seq(n_tok: int) -> np.ndarray | None:
    """The sequence of each of n_tok batch rows, or None (one sequence, or not these rows)."""
    seq = ROW_SEQ.get()
    return seq if seq is not None and seq.shape[0] == n_tok else None


def per_sequence(fn, out: np.ndarray, x: np.ndarray, seq: np.ndarray | None) -> None:
    """fn(out, x) over all rows, or, when the rows hold several sequences (seq i32[n_tok], see
    ROW_SEQ), over each sequence's rows apart, as that sequence would run alone."""
    if seq is None or seq.size < 2 or (seq == seq[0]).all():
        fn(out, x)
        return
    for s in np.unique(seq):
        rows = np.flatnonzero(seq == s)
        part = np.empty((rows.size,) + out.shape[1:], out.dtype)
        fn(part, np.ascontiguousarray(x[rows]))
        out[rows] = part


class Linear:
    """y = W x (+ bias) for a GGUF weight; W stays in its on-disk format."""

    def __init__(self, name: str, qtype, shape, data: np.ndarray):
        self.name, self.qtype = name, T(qtype)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) == 1:  # a single row, e.g. qwen2moe's ffn_gate_inp_shexp
            self.shape = (1,) + self.shape
        self.qt = quant_type(self.qtype)
        n_cols = self.shape[-1]
        if n_cols % self.qt.block_size:
            raise GGUFFormatError(f"{name}: row length {n_cols} is not a multiple of "
                                  f"{self.qtype.name}'s block size {self.qt.block_size}")
        rb = self.qt.row_bytes(n_cols)
        raw = data.reshape(-1).view(np.uint8)
        if raw.size != math.prod(self.shape[:-1]) * rb:
            raise GGUFFormatError(f"{name}: {raw.size} bytes do not fit {self.qtype.name} {self.shape}")
        self.rows = raw.reshape(self.shape[:-1] + (rb,))  # u8[..., rows, row_bytes]
        self.bias: np.ndarray | None = None

    @property
    def n_out(self) -> int:
        return self.shape[-2]

    @property
    def n_in(self) -> int:
        return self.shape[-1]

    def stacked(self, e: int) -> "Linear":
        """Matrix e of a 3-D stack (expert e), as a zero-copy Linear."""
        sub = Linear.__new__(Linear)
        sub.name, sub.qtype, sub.qt = f"{self.name}[{e}]", self.qtype, self.qt
        sub.shape, sub.rows, sub.bias = self.shape[1:], self.rows[e], None
        return sub

    def matmul_into(self, out: np.ndarray, x) -> None:  # out f32[n_tok, n_out], x f32[n_tok, n_in] or its Activation
        if x.shape[-1] != self.n_in or out.shape != (x.shape[0], self.n_out):  # the nogil kernels do not check
            raise LocalMoEError(f"{self.name} {self.shape}: inputs {x.shape} / outputs {out.shape} do not fit")
        act = x.prepared(self.qt) if isinstance(x, Activation) else self.qt.prepare(x)
        seq = (x.seq if isinstance(x, Activation) else row_seq(x.shape[0])) if self.qtype in FLOAT_TYPES else None
        per_sequence(lambda o, a: self.qt.matmul_prepared_into(o, a, self.rows), out, act, seq)  # see ROW_SEQ
        if self.bias is not None:
            out += self.bias

    def __call__(self, x, out: np.ndarray | None = None) -> np.ndarray:
        """x f32[n_tok, n_in] or its Activation -> f32[n_tok, n_out]: `out` (e.g. run buffer rows) or a new array."""
        if not isinstance(x, Activation):
            x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], self.n_out), np.float32) if out is None else out
        self.matmul_into(out, x)
        return out

    def get_rows(self, ids) -> np.ndarray:  # f32[len(ids), n_in]: embedding lookup
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((ids.size, self.n_in), np.float32)
        self.qt.dequantize_into(out, np.ascontiguousarray(self.rows[ids]))
        return out

    def dequantize(self) -> np.ndarray:  # f32[shape]
        flat = self.rows.reshape(-1, self.rows.shape[-1])
        out = np.empty((flat.shape[0], self.n_in), np.float32)
        self.qt.dequantize_into(out, flat)
        return out.reshape(self.shape)

    def __repr__(self) -> str:
        return f"<Linear {self.name} {self.qtype.name} {self.shape}>"


class Activation:
    """x f32[n_tok, n_in] and its conversions to the weights' vec_dot formats (QuantType.prepare),
    each made on first use: weights that read the same x (q/k/v, every expert's gate and up)
    share one conversion. `take_rows` gives the rows one expert sees, converted as slices of
    the whole batch's conversion (it is row by row, so identical to converting the rows)."""

    def __init__(self, x: np.ndarray, parent: "Activation | None" = None, rows=None, seq=None):
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.shape = self.x.shape
        self._parent, self._rows = parent, rows
        # each row's sequence (see ROW_SEQ): a row subset keeps its rows' sequences
        self.seq = (row_seq(self.shape[0]) if parent is None else
                    None if parent.seq is None else parent.seq[rows]) if seq is None else seq
        self._prepared = {}  # act_format -> prepared x

    def prepared(self, qt: QuantType):
        act = self._prepared.get(qt.act_format)
        if act is None:
            act = (qt.prepare(self.x) if self._parent is None
                   else qt.take_rows(self._parent.prepared(qt), self._rows))
            self._prepared[qt.act_format] = act
        return act

    def take_rows(self, rows) -> "Activation":
        return Activation(self.x[rows], self, rows)


_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([A-Za-z0-9_]+)\.(weight|bias)$")


def load_tensors(gguf_file) -> tuple[SimpleNamespace, list[SimpleNamespace]]:
    """(global tensors, per-block tensors) keyed by GGUF name.

    2-D+ weights become `Linear`; 1-D weights (norms) become f32 arrays, except
    where a 1-D tensor is a projection (qwen2moe's `ffn_gate_inp_shexp` row). Biases attach to
    their weight as `.bias`; a bias with no weight (deepseek2's exp_probs_b) is
    an f32 array under its own name.
    """
    n_layer = gguf_file.arch_get("block_count")
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or not 0 <= n_layer <= len(gguf_file.tensors):
        raise GGUFFormatError(f"block_count={n_layer!r} does not fit the file's {len(gguf_file.tensors)} tensors")
    top, blocks = {}, [{} for _ in range(n_layer)]
    biases = []
    for name, t in gguf_file.tensors.items():
        m = _NAME.match(name)
        if m is None:
            raise UnsupportedError(f"tensor {name!r}: unexpected name (per-expert tensors of old "
                                   f"Mixtral conversions are not supported; re-convert the model)")
        layer, base, kind = m.groups()
        if layer is not None and int(layer) >= n_layer:
            raise GGUFFormatError(f"tensor {name!r}: block index beyond block_count={n_layer}")
        dst = top if layer is None else blocks[int(layer)]
        if kind == "bias":
            biases.append((dst, base, name, t))
        elif len(t.shape) == 1 and not base.endswith("_inp_shexp"):
            dst[base] = _as_f32(name, t)
        else:
            dst[base] = Linear(name, t.qtype, t.shape, t.data)
    for dst, base, name, t in biases:
        if base in dst:
            dst[base].bias = _as_f32(name, t)
        else:
            dst[base] = _as_f32(name, t)
    return SimpleNamespace(**top), [SimpleNamespace(**b) for b in blocks]


def _as_f32(name, t) -> np.ndarray:
    if T(t.qtype) == T.F32:
        return t.data.view(np.float32).reshape(t.shape)
    return Linear(name, t.qtype, t.shape, t.data).dequantize().reshape(t.shape)

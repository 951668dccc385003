"""Array-level entry points: dequantize, matvec, matmul.

`raw` is a tensor's bytes as a uint8 array of any shape with the right byte
count (a native float32/float16 view is accepted too); `shape` is numpy order,
(rows, cols) = GGUF's ne reversed. Leading dims fold into rows.
"""
from __future__ import annotations

import math

import numpy as np

from localmoe.errors import LocalMoEError

from .base import quant_type


class QuantShapeError(LocalMoEError, ValueError):
    """Tensor bytes, shape and activations do not fit together."""


def as_rows(raw: np.ndarray, qtype, shape) -> tuple[np.ndarray, int, int]:
    """View raw as u8[n_rows, row_bytes]; check the byte count. No copy for contiguous input."""
    qt = quant_type(qtype)
    shape = tuple(int(s) for s in shape)
    n_cols = shape[-1]
    n_rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    if n_cols % qt.block_size:
        raise QuantShapeError(f"{qt.qtype.name}: row length {n_cols} is not a multiple of {qt.block_size}")
    raw = np.ascontiguousarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.reshape(-1).view(np.uint8)
    rb = qt.row_bytes(n_cols)
    if raw.size != n_rows * rb:
        raise QuantShapeError(f"{qt.qtype.name} {shape}: expected {n_rows * rb} bytes, got {raw.size}")
    return raw.reshape(n_rows, rb), n_rows, n_cols


def dequantize(raw: np.ndarray, qtype, shape) -> np.ndarray:
    """float32 array of `shape`, bit-exact with gguf.quants.dequantize."""
    w, n_rows, n_cols = as_rows(raw, qtype, shape)
    out = np.empty((n_rows, n_cols), dtype=np.float32)
    quant_type(qtype).dequantize_into(out, w)
    return out.reshape(tuple(int(s) for s in shape))


def matvec(raw: np.ndarray, qtype, shape, x: np.ndarray) -> np.ndarray:
    """y[rows] = W[rows, cols] @ x[cols], without materialising W."""
    w, n_rows, n_cols = as_rows(raw, qtype, shape)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if x.size != n_cols:
        raise QuantShapeError(f"x has {x.size} elements, weight has {n_cols} columns")
    out = np.empty(n_rows, dtype=np.float32)
    quant_type(qtype).matvec_into(out, x, w)
    return out


def matmul(raw: np.ndarray, qtype, shape, x: np.ndarray) -> np.ndarray:
    """Y[n_tok, rows] = X[n_tok, cols] @ W.T: the prefill (batched) variant."""
    w, n_rows, n_cols = as_rows(raw, qtype, shape)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_cols:
        raise QuantShapeError(f"x must be [n_tok, {n_cols}], got {x.shape}")
    out = np.empty((x.shape[0], n_rows), dtype=np.float32)
    quant_type(qtype).matmul_into(out, x, w)
    return out

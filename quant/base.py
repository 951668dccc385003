"""One class per GGML quant type, keyed by gguf.GGMLQuantizationType.

Kernels work on a 2-D uint8 view of a weight tensor: w[n_rows, row_bytes],
row_bytes = (n_cols // block_size) * type_size. Model code never looks
inside those bytes; it calls the methods below.
"""
from __future__ import annotations

import importlib

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

# qtype -> module under localmoe.quant that defines its class; imported lazily
# so that `localmoe --help` does not pay for numba.
_MODULES = {
    T.F32: "floats", T.F16: "floats", T.BF16: "floats",
    T.Q4_0: "legacy", T.Q4_1: "legacy", T.Q5_0: "legacy", T.Q5_1: "legacy", T.Q8_0: "legacy",
    T.Q2_K: "q2_k", T.Q3_K: "q3_k", T.Q4_K: "q4_k", T.Q5_K: "q5_k", T.Q6_K: "q6_k",
}
_REGISTRY: dict[T, "QuantType"] = {}


class QuantType:
    """Subclasses set `qtype` and implement the three kernels below."""

    qtype: T
    block_size: int  # elements per block
    type_size: int   # bytes per block

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if getattr(cls, "qtype", None) is not None:
            cls.block_size, cls.type_size = GGML_QUANT_SIZES[cls.qtype]
            _REGISTRY[cls.qtype] = cls()

    def row_bytes(self, n_cols: int) -> int:
        return (n_cols // self.block_size) * self.type_size

    # out: f32[n_rows, n_cols]   w: u8[n_rows, row_bytes]
    def dequantize_into(self, out: np.ndarray, w: np.ndarray) -> None:
        raise NotImplementedError

    # out: f32[n_rows]   x: f32[n_cols]   w: u8[n_rows, row_bytes]
    def matvec_into(self, out: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
        raise NotImplementedError

    # out: f32[n_tok, n_rows]   x: f32[n_tok, n_cols]   w: u8[n_rows, row_bytes]
    def matmul_into(self, out: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
        raise NotImplementedError

    # w: f32[n_rows, n_cols] -> u8[n_rows, row_bytes] (the quantizer issue fills these in)
    def quantize(self, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"quantizing to {self.qtype.name} is not implemented")

    def __repr__(self) -> str:
        return f"<{self.qtype.name} block={self.block_size} bytes={self.type_size}>"


def quant_type(qtype) -> QuantType:
    """The QuantType instance for a GGMLQuantizationType (or its name)."""
    if isinstance(qtype, str):
        qtype = T[qtype.upper()]
    qtype = T(qtype)
    if qtype not in _REGISTRY:
        mod = _MODULES.get(qtype)
        if mod is None:
            from localmoe.errors import UnsupportedError
            raise UnsupportedError(f"quant type {qtype.name} is not supported")
        importlib.import_module(f"{__package__}.{mod}")
    return _REGISTRY[qtype]


def supported_types() -> list[T]:
    return list(_MODULES)

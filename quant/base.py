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
    """Subclasses set `qtype` and `act_format` and implement dequantize_into, prepare and matmul_prepared_into."""

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

    # --- products: x is converted once to this type's vec_dot format ----------
    # `prepare` does the conversion (Q8_K, Q8_0/1, fp16 rounding, ...); the result
    # feeds any number of weights with n_cols columns, so MoE and q/k/v code
    # convert each activation once. Types sharing an `act_format` accept each
    # other's prepared activations. matvec is the n_tok == 1 case.
    act_format: str

    # x: f32[n_tok, n_cols] (C-contiguous) -> prepared activation (arrays with a leading n_tok axis)
    def prepare(self, x: np.ndarray):
        raise NotImplementedError

    # out: f32[n_tok, n_rows]   act: prepare(x[n_tok, n_cols])   w: u8[n_rows, row_bytes]
    def matmul_prepared_into(self, out: np.ndarray, act, w: np.ndarray) -> None:
        raise NotImplementedError

    # out: f32[n_mat, n_sel, n_rows]   stacks: n_mat x u8[n_expert, n_rows, row_bytes]   sel, xrow: i64[n_sel]
    def matvec_experts_into(self, out: np.ndarray, act, stacks, sel: np.ndarray, xrow: np.ndarray,
                            gstart: np.ndarray | None = None) -> None:
        """out[m, s] = stacks[m][sel[s]] @ x[xrow[s]]: a MoE step's expert matvecs, one matvec each
        (common.FusedExperts runs them all in one parallel region instead, slots of one group
        gstart[g]..gstart[g+1]-1, which share an expert, reading its rows once)."""
        for m, w in enumerate(stacks):
            for s in range(len(sel)):
                self.matmul_prepared_into(out[m, s][None], self.take_rows(act, slice(xrow[s], xrow[s] + 1)), w[sel[s]])

    @staticmethod
    def take_rows(act, rows):
        """The prepared activation of x[rows] (conversion is row by row, so this equals prepare(x[rows]))."""
        return tuple(a[rows] for a in act) if isinstance(act, tuple) else act[rows]

    # out: f32[n_rows]   x: f32[n_cols]   w: u8[n_rows, row_bytes]
    def matvec_into(self, out: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
        self.matmul_prepared_into(out[None, :], self.prepare(x[None, :]), w)

    # out: f32[n_tok, n_rows]   x: f32[n_tok, n_cols]   w: u8[n_rows, row_bytes]
    def matmul_into(self, out: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
        self.matmul_prepared_into(out, self.prepare(x), w)

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

"""Quant types and their numba kernels (installed as localmoe.quant)."""
from .api import as_rows, dequantize, matmul, matvec
from .base import QuantType, quant_type, supported_types

__all__ = ["QuantType", "as_rows", "dequantize", "matmul", "matvec", "quant_type", "supported_types"]

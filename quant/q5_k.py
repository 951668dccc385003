"""Q5_K: Q4_K plus a 5th bit per weight in qh[32]; the kernels live in q4_k.py."""
from gguf import GGMLQuantizationType

from .q4_k import KQuant45, make_kernels


class Q5_K(KQuant45):
    qtype = GGMLQuantizationType.Q5_K
    kernels = make_kernels(True)

    def quantize(self, w):
        from .kquant_quantize import quantize_rows  # kept out of the runtime's import path
        return quantize_rows(self, w)

"""The quantize-model fast path: row_kernel reading F16/BF16/F32 rows (as mapped from the input
file) straight into every output type, against ggml_quantize_chunk on the same values
converted by numpy; and numba's on-disk cache of the per-type kernels across processes."""
import os
import subprocess
import sys
from pathlib import Path

import llama_cpp  # noqa: F401  (reference tests import it unconditionally; quant_helpers loads its libggml)
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from localmoe.quant import quant_type
from localmoe.quant.kquant_quantize import row_kernel
from quant_helpers import ggml_quantize

OUT_TYPES = [T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.F16, T.BF16]


def _source_rows(src: T, seed: int, n_rows: int = 9, n_cols: int = 512) -> np.ndarray:
    """u8[n_rows, n_cols * itemsize] in `src`: random magnitudes, fp16 subnormals, a zero row, -0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-6, 3, (n_rows, 1)).astype(np.float32)
    x[1, ::7] = np.float32(3e-6)        # fp16 subnormals
    x[2] = 0
    x[3, ::2] = np.float32(-0.0)
    if src == T.F32:
        raw = x.view(np.uint8)
    elif src == T.F16:
        raw = x.astype(np.float16).view(np.uint8)
    else:   # bf16: the top halves of float32 values
        raw = (x.view(np.uint32) >> 16).astype("<u2").view(np.uint8)
    return raw.copy()


def _as_f32(raw: np.ndarray, src: T) -> np.ndarray:
    if src == T.F32:
        return raw.view(np.float32).copy()
    if src == T.F16:
        return raw.view(np.float16).astype(np.float32)
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


@pytest.mark.reference
@pytest.mark.parametrize("src", [T.F16, T.BF16, T.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("out_type", OUT_TYPES, ids=lambda t: t.name)
def test_row_kernel_from_source_rows_matches_ggml(src, out_type):
    raw = _source_rows(src, seed=int(out_type) * 10 + int(src))
    x = _as_f32(raw, src)
    qt = quant_type(out_type)
    out = np.full((raw.shape[0], qt.row_bytes(x.shape[1])), 0xAA, np.uint8)   # stale bytes must be overwritten
    row_kernel(int(out_type))(out, raw, int(src), qt.type_size)
    ref = ggml_quantize(out_type, x)
    diff = np.flatnonzero((out != ref).any(axis=1))
    assert diff.size == 0, f"{src.name} -> {out_type.name}: rows {diff.tolist()} differ from ggml (exact bytes)"


def test_kernels_load_from_numba_cache_in_a_new_process():
    """Two fresh processes: the second must not compile (cache keyed by the closure's type constant)."""
    code = ("import numpy as np\n"
            "from localmoe.quant.kquant_quantize import row_kernel\n"
            "k = row_kernel(8)\n"   # Q8_0
            "k(np.empty((2, 34), np.uint8), np.ones((2, 64), np.uint8), 1, 34)\n"
            "print(sum(k.stats.cache_misses.values()), sum(k.stats.cache_hits.values()))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    runs = [subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
            .stdout.split() for _ in range(2)]
    assert runs[1] == ["0", "1"], f"second process: (cache misses, hits) = {runs[1]}, want (0, 1)"

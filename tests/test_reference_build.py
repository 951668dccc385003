"""The reference llama.cpp is built as tests/install_reference.py builds it: native, minus AMX.

A native build on an Intel CPU with AMX dies with SIGSEGV at `ldtilecfg` on every quantized model
(GCC 12 drops the tile-config stores in ggml's AMX code). These tests fail on such a build, and on a
build that lost the CPU's other features (which would weaken the reference).
"""
import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

pytestmark = pytest.mark.reference

X86 = platform.machine() in ("x86_64", "AMD64")
# /proc/cpuinfo flag -> ggml's report of what it was compiled for
FEATURES = {"avx2": "avx2", "avx512f": "avx512", "avx512_vnni": "avx512_vnni",
            "avx512vbmi": "avx512_vbmi", "avx512_bf16": "avx512_bf16", "avx_vnni": "avx_vnni"}


def ggml_cpu():
    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not X86, reason="AMX exists only on x86-64")
def test_amx_compiled_out():
    assert ggml_cpu().ggml_cpu_has_amx_int8() == 0, \
        "llama-cpp-python was built with AMX: run `python tests/install_reference.py`"


@pytest.mark.skipif(not X86, reason="the feature list is x86-64's")
def test_native_features_kept():
    """Every SIMD feature this CPU has is compiled in (a native build), so the reference keeps
    its AVX-512/VNNI and CPU_REPACK kernels."""
    lib, flags = ggml_cpu(), cpu_flags()
    got = {f: bool(getattr(lib, f"ggml_cpu_has_{g}")()) for f, g in FEATURES.items()}
    assert got == {f: f in flags for f in FEATURES}


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M"])
def test_quantized_model_runs(ftype):
    """llama.cpp evaluates a quantized model in a child process (a fault there would kill pytest)."""
    code = ("import sys; sys.path[:0] = ['tests', '.']; import reference as r; "
            f"f = r.model_file('qwen3moe', {ftype!r}); "
            "print(r.logits_batch(f, r.tokenize(f, r.PROMPT)).shape)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).parent.parent)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr[-2000:]}"

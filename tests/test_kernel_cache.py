"""Numba's on-disk cache must serve every cached kernel to the next process.

numba keys a cached closure on its pickled cell contents; a dispatcher or intrinsic pickles
with a per-process id, so a cache=True closure over one recompiled at every start (a Q4_K_M
model's `localmoe run` spent ~4 s on it). quant/common.specialise binds such kernels as globals."""
import importlib
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest
from numba.core.dispatcher import Dispatcher

import localmoe.quant

STABLE = (bool, int, float, str, bytes, type(None))


def _stable(value) -> bool:
    if isinstance(value, tuple):
        return all(_stable(v) for v in value)
    return isinstance(value, STABLE)


def _cached_dispatchers():
    """(where, dispatcher) for every cache=True kernel reachable from localmoe.quant's modules."""
    seen = set()

    def walk(where, value, depth=0):
        if isinstance(value, staticmethod):
            value = value.__func__
        if isinstance(value, Dispatcher):
            if type(value._cache).__name__ != "NullCache" and id(value) not in seen:  # cache=True
                seen.add(id(value))
                yield where, value
        elif isinstance(value, tuple) and depth < 2:
            for i, v in enumerate(value):
                yield from walk(f"{where}[{i}]", v, depth + 1)
        elif isinstance(value, type) and depth == 0:
            for k, v in vars(value).items():
                yield from walk(f"{where}.{k}", v, depth + 1)

    for info in pkgutil.iter_modules(localmoe.quant.__path__):
        mod = importlib.import_module(f"localmoe.quant.{info.name}")
        for name, value in vars(mod).items():
            yield from walk(f"{info.name}.{name}", value)


def test_no_cached_kernel_closes_over_unpicklable_state():
    found = list(_cached_dispatchers())
    assert len(found) > 20, f"only {len(found)} cached kernels found: the walk is broken"
    bad = [(where, d.py_func.__code__.co_freevars) for where, d in found
           if d.py_func.__closure__ and not all(_stable(c.cell_contents) for c in d.py_func.__closure__)]
    assert not bad, f"cache=True kernels whose closure changes key every process: {bad}"


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q3_K", "Q8_0"])
def test_second_process_compiles_nothing(tmp_path, qtype):
    code = textwrap.dedent(f"""
        import numpy as np
        from gguf import GGMLQuantizationType as T, GGML_QUANT_SIZES
        import localmoe.quant as q
        from localmoe.quant import quant_type
        qt = quant_type(T.{qtype})
        bs, ts = GGML_QUANT_SIZES[T.{qtype}]
        w = np.zeros((2, 64, 256 // bs * ts), np.uint8)
        act = qt.prepare(np.ones((1, 256), np.float32))
        out = np.empty((1, 2, 64), np.float32)
        qt.matvec_experts_into(out, act, [w], np.array([0, 1]), np.array([0, 0]))
        q.matvec(w[0], T.{qtype}, (64, 256), np.ones(256, np.float32))
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_DEBUG_CACHE="1")
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert "data saved" in runs[0].stdout + runs[0].stderr, "the first process should fill the cache"
    saved = [ln for ln in (runs[1].stdout + runs[1].stderr).splitlines() if "saved" in ln]
    assert not saved, f"the second process recompiled: {saved}"

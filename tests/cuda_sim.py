"""numba-cuda's simulator for the GPU tests (tests/test_cuda_*.py).

`enable()` switches numba.cuda to the simulator (NUMBA_ENABLE_CUDASIM=1) before anything
imports numba.cuda in this process; the CPU path never imports it, so the rest of the suite
is unaffected. Skips when numba-cuda is not installed (it is the optional `cuda` extra,
which the test extra also lists).
"""
import os
import sys

import pytest


def enable():
    if "numba.cuda" in sys.modules and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        raise RuntimeError("numba.cuda was imported before the simulator was enabled")
    pytest.importorskip("numba_cuda", reason="numba-cuda (the `cuda` extra) is not installed")
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    import numba
    numba.core.config.reload_config()
    from numba import cuda
    assert cuda.is_available()  # the simulator is always available
    return cuda

"""Type and compile every GPU kernel to PTX (sm_80) with the hardware launch shapes, without
a GPU: NVVM and libdevice come from a CUDA toolkit (CUDA_HOME). The simulator runs kernels as
Python and never types them; this catches what only the real compiler rejects.

    CUDA_HOME=/usr/local/cuda-13.0 python tests/cuda_ptx.py     # prints one line per kernel

numba-cuda asks NVRTC for the architecture list and the libdevice path; a toolkit without
NVRTC's library answers neither, so both are given here.
"""
import os
import sys
from pathlib import Path

from numba import cuda
from numba import types as t

home = Path(os.environ["CUDA_HOME"])
import numba.cuda.codegen as cg  # noqa: E402
import numba.cuda.cudadrv.libs as libs  # noqa: E402
import numba.cuda.cudadrv.nvvm as nvvm  # noqa: E402

cg.nvrtc.get_arch_option = lambda major, minor, *a: f"compute_{major}{minor}"
libs.get_libdevice = nvvm.get_libdevice = lambda *a: str(next(home.glob("nvvm/libdevice/libdevice*.bc")))

from gguf import GGMLQuantizationType as T  # noqa: E402

from localmoe.gpu import attention, matvec, ops, router  # noqa: E402

F1, F2, F3, H2, H3, I1 = (t.float32[:], t.float32[:, :], t.float32[:, :, :], t.float16[:, :], t.float16[:, :, :],
                          t.int32[:])
KERNELS = [(f"matvec {qt.name} tile {tile}",
            matvec.make_kernel(matvec._module(qt).dequant_unit_f32 if qt == T.F32 else matvec._module(qt).dequant_unit,
                               tile),
            (F2, F2, {T.F16: H2, T.F32: F2}.get(qt, t.uint8[:, :]), F2 if qt == T.F32 else H2, I1, I1, t.int32))
           for qt in (T.Q8_0, T.Q4_K, T.Q6_K, T.Q3_K, T.F16, T.F32) for tile in (1, matvec.TILE)]
KERNELS += [("rms_norm", ops._rms_norm, (F2, F2, F1, t.float32)),
            ("rope", ops._rope, (F3, F2, F2, t.int32, t.boolean)),
            ("swiglu", ops._swiglu, (F2, F2, F2)),
            ("add", ops._add, (F1, F1, F1)),
            ("fill", ops._fill, (F1, t.float32)),
            ("add_rows", ops._add_rows, (F2, F1)),
            ("weighted_sum", ops._weighted_sum, (F2, F2, I1, I1, F1)),
            ("kv_store", ops._kv_store, (H3, F3, t.int32)),
            ("copy3", ops._copy3, (F3, F3)),
            ("add_gated", ops._add_gated, (F2, F2, F2)),
            ("attention", attention._attention, (F3, F3, F3, H3, H3, t.int32, t.float32)),
            ("route", router._route, (t.int32[:, :], F2, F2, F2, F2, F2, F1, t.int32, t.boolean, t.float32, t.int32))]

if __name__ == "__main__":
    failed = 0
    for name, k, sig in KERNELS:
        try:
            ptx, _ = cuda.compile_ptx(k.py_func, sig, cc=(8, 0))
            print(f"ok {name}: {len(ptx)} bytes of PTX")
        except Exception as e:
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)

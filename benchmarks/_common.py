"""Shared benchmark helpers: timing medians, tables, thread control, the read roofline."""
from __future__ import annotations

import ctypes
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

GB = 1e9


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextmanager
def numba_threads(n: int):
    """Run the block with numba's pool limited to n threads."""
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old)


def thread_counts(spec: str) -> list[int]:
    """'1,2' -> [1, 2], checked against numba's pool size."""
    counts = [int(s) for s in spec.split(",") if s.strip()]
    bad = [n for n in counts if not 1 <= n <= numba.config.NUMBA_NUM_THREADS]
    if bad:
        raise SystemExit(f"thread counts {bad} outside 1..{numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS)")
    return counts


@njit(cache=True, nogil=True, parallel=True)
def stream_sum(a, n_chunks):  # a u64[n] -> u64; integer adds, slice .sum() vectorises (a[i] loops do not)
    step = (a.size + n_chunks - 1) // n_chunks
    total = np.uint64(0)
    for c in prange(n_chunks):
        total += a[c * step:min(a.size, (c + 1) * step)].sum()
    return total


def stream_array(gib: float = 1.0) -> np.ndarray:
    """The array read_bandwidth streams; ones, so its pages are really allocated."""
    return np.ones(int(gib * 2**30) // 8, dtype=np.uint64)


def read_bandwidth(a: np.ndarray, threads: list[int], repeats: int = 5) -> dict[int, float]:
    """Machine read bandwidth in GB/s per thread count: median of `repeats` stream_sum passes over a."""
    out = {}
    for n in threads:
        with numba_threads(n):
            t = median_time(lambda: stream_sum(a, 64 * n), repeats)
        out[n] = a.nbytes / t / GB
    return out


def print_table(header: list[str], rows: list[list], title: str | None = None) -> None:
    """Plain fixed-width table; numbers right-aligned, text left-aligned."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(str(h))] + [len(r[i]) for r in cells if i < len(r)]) for i, h in enumerate(header)]
    if title:
        print(title)
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for raw, r in zip(rows, cells):
        print("  ".join(f"{c:>{w}}" if isinstance(v, (int, float)) else f"{c:<{w}}"
                        for v, c, w in zip(raw, r, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):  # three significant digits, no exponent for ordinary sizes
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return "" if v is None else str(v)


# ---- llama.cpp's own kernels, called through ctypes from llama-cpp-python's libggml ----

class InitParams(ctypes.Structure):  # struct ggml_init_params (ggml.h)
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_GGML = None


def ggml_lib():
    """libggml-base + libggml-cpu from the installed llama_cpp wheel.

    Signatures as in ggml.h, ggml-backend.h, ggml-alloc.h and ggml-cpu.h of llama.cpp.
    """
    global _GGML
    if _GGML is not None:
        return _GGML
    import llama_cpp
    libdir = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(libdir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(libdir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    P, I64, SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    sigs = {
        (base, "ggml_init"): ([InitParams], P), (base, "ggml_free"): ([P], None),
        (base, "ggml_tensor_overhead"): ([], SZ), (base, "ggml_graph_overhead_custom"): ([SZ, ctypes.c_bool], SZ),
        (base, "ggml_new_tensor_1d"): ([P, ctypes.c_int, I64], P),
        (base, "ggml_new_tensor_2d"): ([P, ctypes.c_int, I64, I64], P),
        (base, "ggml_nbytes"): ([P], SZ), (base, "ggml_mul_mat"): ([P, P, P], P),
        (base, "ggml_new_graph_custom"): ([P, SZ, ctypes.c_bool], P),
        (base, "ggml_build_forward_expand"): ([P, P], None),
        (base, "ggml_backend_cpu_buffer_type"): ([], P), (base, "ggml_backend_buft_name"): ([P], ctypes.c_char_p),
        (base, "ggml_backend_alloc_ctx_tensors_from_buft"): ([P, P], P),
        (base, "ggml_backend_buffer_free"): ([P], None),
        (base, "ggml_backend_tensor_set"): ([P, P, SZ, SZ], None),
        (base, "ggml_backend_tensor_get"): ([P, P, SZ, SZ], None),
        (base, "ggml_backend_reg_dev_get"): ([P, SZ], P),
        (base, "ggml_backend_reg_get_proc_address"): ([P, ctypes.c_char_p], P),
        (base, "ggml_backend_dev_supports_op"): ([P, P], ctypes.c_bool),
        (base, "ggml_backend_graph_compute"): ([P, P], ctypes.c_int),
        (base, "ggml_backend_free"): ([P], None),
        (base, "ggml_log_set"): ([P, P], None),
        # plain (allocating) contexts, for tests/test_ggml_ops.py's element-wise ops
        (base, "ggml_get_data"): ([P], P), (base, "ggml_new_graph"): ([P], P),
        (base, "ggml_silu"): ([P, P], P), (base, "ggml_sigmoid"): ([P, P], P), (base, "ggml_soft_max"): ([P, P], P),
        (base, "ggml_swiglu_split"): ([P, P, P], P), (base, "ggml_sum_rows"): ([P, P], P),
        (cpu, "ggml_backend_cpu_reg"): ([], P), (cpu, "ggml_backend_cpu_init"): ([], P),
        (cpu, "ggml_backend_cpu_set_n_threads"): ([P, ctypes.c_int], None),
        (cpu, "ggml_graph_compute_with_ctx"): ([P, P, ctypes.c_int], ctypes.c_int),
        (cpu, "quantize_row_q8_K"): ([P, P, I64], None),  # ggml-cpu/quants.h: the activation conversion
    }
    lib = {}
    for (so, name), (args, res) in sigs.items():
        f = getattr(so, name)
        f.argtypes, f.restype = args, res
        lib[name] = f
    lib["ggml_log_set"](ctypes.cast(_log_cb, P), None)
    _GGML = lib
    return lib


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _log_cb(level, text, _):
    """Pass on ggml's warnings and errors; drop its debug/info chatter (one line per repacked tensor)."""
    if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
        sys.stderr.write(text.decode(errors="replace"))


def ggml_repack_buft():
    """The CPU backend's "CPU_REPACK" extra buffer type (what llama.cpp puts weights in by default), or None."""
    g = ggml_lib()
    reg = g["ggml_backend_cpu_reg"]()
    fn = g["ggml_backend_reg_get_proc_address"](reg, b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return None
    get_extra_bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)
    bufts = get_extra_bufts(g["ggml_backend_reg_dev_get"](reg, 0))  # NULL-terminated array
    i = 0
    while bufts[i]:
        if g["ggml_backend_buft_name"](bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None


class GgmlMatvec:
    """y = W @ x by ggml_mul_mat on llama.cpp's CPU backend: one single-node graph per weight copy.

    copies: list of u8[n_rows, row_bytes] (the same bytes localmoe reads); x: f32[n_cols].
    repack=True puts the weights in the CPU_REPACK buffer type as llama.cpp does by default
    (interleaved rows, e.g. Q4_K -> q4_K_8x8 on AVX2); GgmlMatvec.create returns None when
    this CPU has no repacked kernel for the type.
    """

    @classmethod
    def create(cls, ggml_type: int, copies: list[np.ndarray], x: np.ndarray, repack: bool = False):
        buft = ggml_repack_buft() if repack else ggml_lib()["ggml_backend_cpu_buffer_type"]()
        if buft is None:
            return None
        self = cls(ggml_type, copies, x, buft)
        if repack and not self.g["ggml_backend_dev_supports_op"](self.dev, self.outs[0]):
            self.close()  # no repacked layout for this type/CPU: llama.cpp would use the plain path
            return None
        self.fill(copies, x)
        return self

    def __init__(self, ggml_type, copies, x, buft):
        g = self.g = ggml_lib()
        self.n_rows, n_cols, k = copies[0].shape[0], x.size, len(copies)
        def meta(n_tensors):  # metadata-only contexts: tensor data lives in backend buffers
            size = n_tensors * g["ggml_tensor_overhead"]() + k * g["ggml_graph_overhead_custom"](4, False)
            return g["ggml_init"](InitParams(size + (1 << 16), None, True))

        self.buf_w = self.buf_a = self.backend = None
        self.ctx_w, self.ctx_a = meta(k), meta(2 * k + 1)
        self.dev = g["ggml_backend_reg_dev_get"](g["ggml_backend_cpu_reg"](), 0)
        self.xt = g["ggml_new_tensor_1d"](self.ctx_a, 0, n_cols)  # GGML_TYPE_F32
        self.wts = [g["ggml_new_tensor_2d"](self.ctx_w, ggml_type, n_cols, self.n_rows) for _ in copies]  # ne0 = cols
        if g["ggml_nbytes"](self.wts[0]) != copies[0].nbytes:
            self.close()
            raise ValueError(f"ggml wants {g['ggml_nbytes'](self.wts[0])} bytes per copy, have {copies[0].nbytes}")
        self.outs = [g["ggml_mul_mat"](self.ctx_a, wt, self.xt) for wt in self.wts]
        self.graphs = []
        for out in self.outs:
            graph = g["ggml_new_graph_custom"](self.ctx_a, 4, False)
            g["ggml_build_forward_expand"](graph, out)
            self.graphs.append(graph)
        self.buf_a = g["ggml_backend_alloc_ctx_tensors_from_buft"](self.ctx_a, g["ggml_backend_cpu_buffer_type"]())
        self.buf_w = g["ggml_backend_alloc_ctx_tensors_from_buft"](self.ctx_w, buft)
        if not (self.buf_a and self.buf_w):
            self.close()
            raise MemoryError("ggml could not allocate the benchmark buffers")
        self.backend = g["ggml_backend_cpu_init"]()

    def fill(self, copies, x):
        for wt, c in zip(self.wts, copies):  # the repack buffer interleaves rows here
            self.g["ggml_backend_tensor_set"](wt, c.ctypes.data, 0, c.nbytes)
        self.g["ggml_backend_tensor_set"](self.xt, x.ctypes.data, 0, x.nbytes)

    def run(self, i: int, n_threads: int) -> None:
        """Compute the graph of copy i."""
        self.g["ggml_backend_cpu_set_n_threads"](self.backend, n_threads)
        if self.g["ggml_backend_graph_compute"](self.backend, self.graphs[i]) != 0:
            raise RuntimeError("ggml_backend_graph_compute failed")

    def result(self, i: int) -> np.ndarray:
        y = np.empty(self.n_rows, dtype=np.float32)
        self.g["ggml_backend_tensor_get"](self.outs[i], y.ctypes.data, 0, y.nbytes)
        return y

    def close(self):
        g = self.g
        for attr, free in (("backend", "ggml_backend_free"), ("buf_w", "ggml_backend_buffer_free"),
                           ("buf_a", "ggml_backend_buffer_free"), ("ctx_w", "ggml_free"), ("ctx_a", "ggml_free")):
            if getattr(self, attr):
                g[free](getattr(self, attr))
                setattr(self, attr, None)

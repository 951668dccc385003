"""Helpers shared by the kernels: fp16 decoding and the Q8_K activation format.

llama.cpp's CPU backend quantizes the activation row once per matmul into the
weight type's "vec_dot_type" and then does integer dot products. We do the
same, both for speed and so that our rounding matches llama.cpp's.
"""
import types as pytypes

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

QK_K = 256

# Every fp16 bit pattern -> float32 (exact; covers subnormals, inf, nan, -0).
F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(inline="always")
def read_f16(w, r, o):
    """fp16 stored little-endian at w[r, o:o+2] -> float32."""
    return F16_TO_F32[np.int32(w[r, o]) | (np.int32(w[r, o + 1]) << 8)]


@njit(nogil=True, cache=True, error_model="numpy")  # IEEE division: an inf in x gives d = -inf as in ggml, not an exception
def quantize_q8_k(x, qs, d, bsums):
    """Like ggml's quantize_row_q8_K_ref (the x86 CPU path), in loops LLVM vectorizes.

    x: f32[n]  qs: i8[n]  d: f32[n // 256]  bsums: i32[n // 16]; n % 256 == 0.
    """
    bits = x.view(np.int32)
    for b in range(x.size // QK_K):
        base = b * QK_K
        # ggml keeps the first x of largest |x| (NaN never compares larger). As integers, |x|'s
        # bits order like the floats; NaNs count as 0. Integer max/min reductions vectorize.
        amax = np.int32(0)
        for j in range(base, base + QK_K):
            ab = bits[j] & np.int32(0x7FFFFFFF)
            amax = max(amax, ab if ab <= np.int32(0x7F800000) else np.int32(0))
        if amax == 0:
            d[b] = 0
            qs[base:base + QK_K] = 0
            bsums[b * 16:b * 16 + 16] = 0
            continue
        first = QK_K
        for j in range(QK_K):
            first = min(first, j if bits[base + j] & np.int32(0x7FFFFFFF) == amax else QK_K)
        iscale = np.float32(-127.0) / x[base + first]
        for j in range(base, base + QK_K):
            # rint == ggml's nearest_int (round half to even) for |v| <= 2^22
            qs[j] = min(127, np.int32(np.rint(iscale * x[j])))
        for j in range(QK_K // 16):
            s = np.int32(0)
            for i in range(16):
                s += qs[base + j * 16 + i]
            bsums[b * 16 + j] = s
        d[b] = np.float32(1.0) / iscale


@njit(nogil=True, cache=True, parallel=True)
def quantize_q8_k_rows(x, qs, d, bsums):
    """Row-wise quantize_q8_k. x: f32[n_tok, n]  qs: i8[n_tok, n]  d: f32[n_tok, n//256]  bsums: i32[n_tok, n//16]."""
    for t in prange(x.shape[0]):
        quantize_q8_k(x[t], qs[t], d[t], bsums[t])


def q8_k_buffers(n_tok: int, n: int):
    """Allocate (qs, d, bsums) for n_tok rows of n activations."""
    return (np.empty((n_tok, n), np.int8), np.empty((n_tok, n // QK_K), np.float32),
            np.empty((n_tok, n // 16), np.int32))


# activations up to this many elements are quantized on the calling thread: Q8_0 of 64 x 2048
# takes 0.24 ms there, and the parallel kernel took as long with sleeping (OMP passive) workers
# and 7.8 ms with spinning ones on a busy 2-core machine
SERIAL_ACT = 1 << 17


@njit(nogil=True, cache=True)
def q8_k_serial(x, group):
    """x f32[n_tok, n] -> (qs i8[n_tok, n], d8 f32[n_tok, n//256], sums i32[n_tok, n//group]), on the
    calling thread; sums over `group` (16: ggml's bsums, or 32) consecutive quants."""
    n_tok, n = x.shape
    qs, d8, sums = np.empty((n_tok, n), np.int8), np.empty((n_tok, n // QK_K), np.float32), np.empty((n_tok, n // group), np.int32)
    s16 = np.empty(n // 16, np.int32)
    k = group // 16
    for t in range(n_tok):
        quantize_q8_k(x[t], qs[t], d8[t], s16)
        for i in range(n // group):
            acc = np.int32(0)
            for j in range(k):
                acc += s16[i * k + j]
            sums[t, i] = acc
    return qs, d8, sums


def q8_k_activation(x, group=16):
    """x f32[n_tok, n] -> (qs i8[n_tok, n], d8 f32[n_tok, n//256], sums i32[n_tok, n//group]), sums over
    16 (ggml's bsums) or 32 quants. A few rows (decode) skip the parallel region: its fork/join would
    cost more than the work."""
    if x.size <= SERIAL_ACT:
        return q8_k_serial(x, group)
    qs, d8, bsums = q8_k_buffers(*x.shape)
    quantize_q8_k_rows(x, qs, d8, bsums)
    return qs, d8, bsums if group == 16 else bsums.reshape(x.shape[0], -1, group // 16).sum(axis=-1, dtype=np.int32)


def specialise(template, name: str, parallel=True, **bound):
    """njit(cache=True, nogil=True, parallel=parallel) kernel of a copy of the plain function `template`
    in which the names in `bound` (the kernels and constants it uses) are globals.

    Why not a closure: numba keys a cached closure on its pickled cell contents, and a dispatcher
    or intrinsic pickles with a per-process id, so a closure over another kernel recompiled in
    every process (seconds at each start). The copy is named `name` (its own cache index) and
    claims the file of the first bound dispatcher, so editing that file invalidates its cache."""
    src = next((v.py_func.__code__.co_filename for v in bound.values() if hasattr(v, "py_func")),
               template.__code__.co_filename)
    fn = pytypes.FunctionType(template.__code__.replace(co_name=name, co_filename=src),
                              {**template.__globals__, **bound}, name)
    fn.__qualname__, fn.__module__ = name, template.__module__
    return njit(cache=True, nogil=True, parallel=parallel)(fn)


def _matvec_x(out, x, w):  # template, see FusedMatvec; out f32[n_rows], x f32[n_cols], w u8[n_rows, row_bytes]
    n = x.size
    if n % BLOCK or w.shape[0] != out.size or w.shape[1] != n // BLOCK * TYPE_SIZE:  # noqa: F821 (bound by specialise)
        raise ValueError("matvec: shapes do not fit")
    a, b, c = prep(x.reshape(1, n))  # noqa: F821 (bound by specialise)
    kernel(out.reshape(1, out.size), a, b, c, w, n_threads())  # noqa: F821 (bound by specialise)


# The one signature of a fuse_matvec kernel; anything else takes the general, checked path
FUSED_SIG = (types.float32[::1], types.float32[::1], types.uint8[:, ::1])


def fuse_matvec(prep, kernel, name: str, qtype):
    """Kernel `name`(out f32[n_rows], x f32[n_cols], w): kernel(out[None], *prep(x[None]), w, n_threads) after a
    shape check (ValueError), for prep(x) -> a 3-tuple activation and kernel(out, a, b, c, w, n_par) the matvec
    on it; w holds rows of the GGML type qtype."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    return specialise(_matvec_x, name, parallel=False, kernel=kernel, prep=prep, BLOCK=block, TYPE_SIZE=type_size)


class FusedMatvec:
    """Mixin: `matvec_into` converts x and runs the matvec in one compiled call, `_matvec_x`
    (a `fuse_matvec` kernel): at MoE expert shapes a matvec lasts 20-40 us, and a separate
    `prepare` (array allocations in Python, a second dispatch) added 4-6 us to it. Its argument
    checks are numba's dispatch (the one signature FUSED_SIG; TypeError for any other) and the
    kernel's own shape check (ValueError): checking in Python cost 1.5 us a call."""

    _matvec_x = None
    _fused_ready = False

    def matvec_into(self, out, x, w):
        if not self._fused_ready:
            self._ready_fused()
        try:
            self._matvec_x(out, x, w)
        except (TypeError, ValueError):  # the general path, with its checks and messages
            super().matvec_into(out, x, w)

    @classmethod
    def _ready_fused(cls):
        """Compile (or load from cache) FUSED_SIG only, and let no call compile another."""
        k = cls._matvec_x
        k.compile(FUSED_SIG)
        k.disable_compile()
        cls._fused_ready = True


def c_matrix(*tys):
    """Typing guard for the intrinsics: their pointer arithmetic assumes C-contiguous 2-D arrays."""
    return all(isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" for t in tys)


def row_ptr(context, builder, sig, args, i, idx=(1, 2)):
    """Pointer to element a[r, off] for a = args[i] and r, off = args[i + idx[0]], args[i + idx[1]];
    a C-contiguous 2-D (no bounds check)."""
    aty, arr = sig.args[i], args[i]
    r, off = (context.cast(builder, args[i + j], sig.args[i + j], types.int64) for j in idx)
    a = context.make_array(aty)(context, builder, arr)
    stride = cgutils.unpack_tuple(builder, a.strides)[0]
    size = ir.Constant(ir.IntType(64), context.get_abi_sizeof(context.get_data_type(aty.dtype)))
    byte_ptr = builder.bitcast(a.data, ir.IntType(8).as_pointer())
    p = builder.gep(byte_ptr, [builder.add(builder.mul(r, stride), builder.mul(off, size))])
    return builder.bitcast(p, a.data.type)


@intrinsic
def n_threads(typingctx):
    """numba.get_num_threads() for cached kernels: numba's own overload calls a ctypes pointer, which
    keeps a kernel out of the cache; this calls the threading layer's symbol by name, as parfors do."""
    numba.get_num_threads()  # loads the threading layer, which registers the symbol

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(cgutils.intp_t, []), "get_num_threads")
        return builder.call(fn, [])  # declared as numba's parfors declare it
    return types.intp(), codegen


@intrinsic
def fetch_add(typingctx, counter, i):
    """Atomically counter[i] += 1, returning the old value (no bounds check)."""
    if isinstance(counter, types.Array) and counter.dtype == types.int64 and counter.ndim == 1:
        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            idx = context.cast(builder, args[1], sig.args[1], types.intp)
            return builder.atomic_rmw("add", builder.gep(arr.data, [idx]), ir.Constant(ir.IntType(64), 1), "monotonic")
        return types.int64(counter, i), codegen


COUNTER_STRIDE = 8  # int64s: each thread's counter on a cache line of its own


@njit(inline="always")
def work_counters(n_par):
    """The counters take_item shares between n_par threads. Zeroed in a loop: in a parallel=True kernel numba turns
    np.zeros into a parallel region of its own, a second fork/join per call (Q4_K 2048x768 from L2, 2 threads:
    +1.1 us a call, +2.6 us when the two vCPUs sit far apart)."""
    c = np.empty(n_par * COUNTER_STRIDE, np.int64)
    for i in range(c.size):
        c[i] = 0
    return c


@njit(inline="always")
def take_item(counters, t, n_items, n_par):
    """The next of n_items work items for thread t of n_par (-1: none left). Thread t owns the contiguous items
    t * n_items // n_par ... and takes them in order; when they are gone it takes the others' next items.
    Contiguous: jumping between interleaved items restarted the hardware prefetchers at each one (from DRAM
    at 2 threads, 256-row items from one shared counter -> 128-row items taken so: Q4_K 2048x768 34.7 -> 40.7,
    Q3_K 32.9 -> 37.3, Q6_K 38.1 -> 42.1 GB/s). Dynamic: numba's prange splits statically, so on a busy
    machine the thread that shares its core would finish last and everyone would wait for it."""
    for k in range(n_par):
        u = t + k - n_par if t + k >= n_par else t + k
        i = u * n_items // n_par + fetch_add(counters, u * COUNTER_STRIDE)
        if i < (u + 1) * n_items // n_par:
            return i
    return -1


@intrinsic
def prefetch(typingctx, w, r, o):
    """Hint the cache line of w[r, o] (a C-contiguous 2-D u8 array; no bounds check needed) into L1."""
    if c_matrix(w) and w.dtype == types.uint8:
        def codegen(context, builder, sig, args):
            prefetch_ptr(builder, row_ptr(context, builder, sig, args, 0))
            return context.get_dummy_value()
        return types.void(w, r, o), codegen


def prefetch_ptr(builder, p):
    """Emit a read prefetch of the line at byte pointer p into L1 (prefetcht0)."""
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [p.type, i32, i32, i32]),
                                        "llvm.prefetch.p0i8")
    builder.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])


# Software prefetch distance of the legacy types' matvecs (the K-quants prefetch inside their block loops,
# kquant.BLOCK_PF_BYTES): the hardware prefetchers stop at 4 KiB page
# boundaries, and weights (mmap'd files, numpy arrays under 4 MiB) sit on 4 KiB pages. Prefetching
# one page ahead cut Q4_K 2048x768 (which then prefetched so) from DRAM from 30-34 to 26-28 us per call at 2 threads.
# Only for rows shorter than that: a row's worth of prefetches at once (238 for a 14336-column
# Q8_0 row) crowds out the demand loads (Q8_0 4096x14336 fell from ~40 to 21 GB/s).
PF_BYTES = 4096


@njit(inline="always")
def rows_ahead(w):  # w u8[n_rows, row_bytes] -> how many rows ahead prefetch_row should look (0: none)
    return (PF_BYTES + w.shape[1] - 1) // w.shape[1] if w.shape[1] < PF_BYTES else 0


@njit(inline="always")
def prefetch_row(w, r, ahead):
    """Hint row r + ahead of w (u8[n_rows, row_bytes]) into cache, unless ahead is 0; a row past the
    end is harmless (prefetches do not fault)."""
    if ahead:
        for o in range(0, w.shape[1], 64):
            prefetch(w, r + ahead, o)


# rows per work item of a matvec (take_item: each thread runs through contiguous items)
MATVEC_CHUNK = 128


def _matvec_experts(out, act, ws, sel, xrow, gstart, n_par):  # template, see make_matvec_experts; out f32[n_mat, n_sel, n_rows], act: tuple of [n_x, ...] arrays, ws: n_mat x u8[n_expert, n_rows, row_bytes], sel/xrow i64[n_sel], gstart i64[n_groups + 1]
    n_mat, n_sel, n_rows = out.shape
    n_groups = gstart.shape[0] - 1
    n_chunks = (n_rows + MATVEC_CHUNK - 1) // MATVEC_CHUNK
    n_items = n_mat * n_groups * n_chunks
    counters = work_counters(n_par)
    for t in prange(n_par):
        i = take_item(counters, t, n_items, n_par)
        while i >= 0:
            mg, c = i // n_chunks, i % n_chunks
            m, g = mg // n_groups, mg % n_groups
            w = ws[m][sel[gstart[g]]]
            for r in range(c * MATVEC_CHUNK, min(n_rows, (c + 1) * MATVEC_CHUNK)):
                for s in range(gstart[g], gstart[g + 1]):  # the group's slots reuse row r from L1
                    out[m, s, r] = row(w, r, act, xrow[s])  # noqa: F821 (bound by specialise)
            i = take_item(counters, t, n_items, n_par)


def make_matvec_experts(row, name: str, parallel=True):
    """Kernel `name`(out, act, ws, sel, xrow, gstart, n_par): out[m, s] = ws[m][sel[s]] @ x[xrow[s]]
    for every matrix m and slot s (llama.cpp's mul_mat_id: a MoE step's expert matvecs) in one parallel
    region, rows taken MATVEC_CHUNK at a time (common.take_item). Slots gstart[g]..gstart[g + 1] - 1
    share one expert (sel equal there) and go through each of its rows together. `row(w, r, act, t)` is
    one row's dot with token t of the prepared activation tuple `act`."""
    return specialise(_matvec_experts, name, parallel, row=row)


def check_expert_stacks(qt, out, act, stacks, sel, xrow):
    """The checks matvec_experts kernels rely on (they index without bounds checks)."""
    qs = act[0]
    if (not all(w.ndim == 3 and w.shape[1:] == (out.shape[2], qt.row_bytes(qs.shape[1])) and w.flags.c_contiguous
                for w in stacks) or len(stacks) != out.shape[0] or qs.dtype != np.int8
            or len(sel) != out.shape[1] or len(xrow) != out.shape[1] or sel.min() < 0 or xrow.min() < 0
            or sel.max() >= min(w.shape[0] for w in stacks) or xrow.max() >= qs.shape[0]):
        raise ValueError(f"{qt.qtype.name}: expert stacks do not fit out {out.shape} / activation {qs.shape}")


# products of at most this many multiply-adds run on the calling thread: a parallel region's fork
# and join cost more (legacy types' matmuls and fused experts; see legacy.matmul_q8act_serial)
SERIAL_MACS = 1 << 19


class FusedExperts:
    """Mixin: `matvec_experts_into` runs all of a MoE decode step's expert matvecs in one parallel region, the
    kernel `_experts` (a make_matvec_experts kernel; None: the base class's matvec per expert). One region
    matters on a busy machine, where every fork/join can wait for a descheduled thread."""

    _experts = None
    _experts_serial = None  # the same kernel without a parallel region, for small products (SERIAL_MACS)

    def matvec_experts_into(self, out, act, stacks, sel, xrow, gstart=None):
        if self._experts is None:
            return super().matvec_experts_into(out, act, stacks, sel, xrow, gstart)
        check_expert_stacks(self, out, act, stacks, sel, xrow)
        if gstart is None:
            gstart = np.arange(len(sel) + 1, dtype=np.int64)
        elif gstart[0] != 0 or gstart[-1] != len(sel) or (np.diff(gstart) <= 0).any() \
                or (sel[gstart[:-1].repeat(np.diff(gstart))] != sel).any():
            raise ValueError(f"{self.qtype.name}: expert groups {gstart} do not fit the slots {sel}")
        if self._experts_serial is not None and out.size * act[0].shape[-1] <= SERIAL_MACS:
            self._experts_serial(out, tuple(act), tuple(stacks), sel, xrow, gstart, 1)
        else:
            self._experts(out, tuple(act), tuple(stacks), sel, xrow, gstart, numba.get_num_threads())

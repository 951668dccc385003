"""The K-quant pair-product block kernels (kquant.Vec.maddubs/madd) on every instruction set this
CPU has (generic IR, AVX2, AVX-512BW), against integer sums computed here in numpy; and the Q3_K
matvec against ggml's vec_dot bit for bit."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import Q4_K as GQ4_K
from gguf.quants import dequantize as gguf_dequantize
from numba import njit, prange, types
from numba.extending import intrinsic

from localmoe.quant import quant_type
from localmoe.quant.common import c_matrix, q8_k_activation, row_ptr, take_item, work_counters
from localmoe.quant.kquant import SIMD, SIMD_LEVELS, Vec
from localmoe.quant.q3_k import lanes_q3_k
from localmoe.quant.q4_k import block_sums_k45, lanes_k45
from localmoe.quant.q6_k import sums_q6_k

# the instruction sets this CPU can run: generic IR always, then what kquant picked and below it
SIMDS = [None] + list(SIMD_LEVELS[:SIMD_LEVELS.index(SIMD) + 1] if SIMD else [])
ONE_F16 = np.array([0x3C00], "<u2").view(np.uint8)


def blocks(type_size, n, seed):
    """u8[n, type_size]: random blocks, then an all-0xFF block (largest quants and scales) and an all-zero one."""
    raw = np.random.default_rng(seed).integers(0, 256, (n, type_size), dtype=np.uint8)
    raw[-2], raw[-1] = 0xFF, 0
    return raw


def q8(n, seed):
    """i8[n, 256] Q8_K quants: random, then all +127 and all -127 (the extremes quantize_q8_k makes)."""
    qs = np.random.default_rng(seed).integers(-127, 128, (n, 256)).astype(np.int8)
    qs[-2], qs[-1] = 127, -127
    return qs


def q3_k_lanes_kernel(simd):
    @intrinsic
    def lanes(typingctx, w, r, o, qs, t, qo, out, k, ko):  # out[k, ko:ko+8] <- the i32 lanes of w[r, o:] and qs[t, qo:]
        def codegen(context, builder, sig, args):
            ptr = [row_ptr(context, builder, sig, args, i) for i in (0, 3, 6)]
            ints = lanes_q3_k(Vec(builder, simd), ptr[0], ptr[1], sig.args[3].dtype)
            builder.store(ints, builder.bitcast(ptr[2], ints.type.as_pointer()), align=4)
            return context.get_dummy_value()
        if c_matrix(w, qs, out) and out.dtype == types.int32:
            return types.void(w, r, o, qs, t, qo, out, k, ko), codegen

    @njit
    def run(w, qs, out):  # out i32[n_w * n_x, 8]: each block's lanes
        for r in range(w.shape[0]):
            for t in range(qs.shape[0]):
                lanes(w, r, 0, qs, t, 0, out, r * qs.shape[0] + t, 0)
    return run


def k45_kernel(five, simd):
    lanes = lanes_k45(five)

    @intrinsic
    def sums(typingctx, w, r, o, qs, t, qo, bs32, t2, bo, out, k, ko):  # out[k, ko:ko+2] <- (sumi, summ)
        def codegen(context, builder, sig, args):
            wp, qp, bp, op = (row_ptr(context, builder, sig, args, i) for i in (0, 3, 6, 9))
            for i, isum in enumerate(block_sums_k45(Vec(builder, simd), wp, qp, bp, sig.args[3].dtype, lanes)):
                builder.store(isum, builder.gep(op, [context.get_constant(types.intp, i)]))
            return context.get_dummy_value()
        if c_matrix(w, qs, bs32, out) and out.dtype == types.int32:
            return types.void(w, r, o, qs, t, qo, bs32, t2, bo, out, k, ko), codegen

    @njit
    def run(w, qs, bs32, out):  # out i32[n_w * n_x, 2]: each block's (sumi, summ)
        for r in range(w.shape[0]):
            for t in range(qs.shape[0]):
                sums(w, r, 0, qs, t, 0, bs32, t, 0, out, r * qs.shape[0] + t, 0)
    return run


@pytest.mark.parametrize("simd", SIMDS, ids=str)
@pytest.mark.parametrize("q8_dtype", [np.int8, np.int16], ids=["i8", "i16"])
def test_q3_k_lanes(simd, q8_dtype):
    w = blocks(110, 40, seed=1)
    w[:, 108:110] = ONE_F16  # d = 1: gguf-py's dequantize gives the integer weights (scale - 32) * q exactly
    qs = q8(12, seed=2)
    iw = gguf_dequantize(w, T.Q3_K).reshape(-1, 256).astype(np.int64)
    # lane k: elements e with e % 32 in 4k..4k+3 (the i32 lanes of ggml's AVX2 kernel)
    want = (iw[:, None, :] * qs[None].astype(np.int64)).reshape(len(w), len(qs), 8, 8, 4).sum(axis=(2, 4))
    got = np.zeros((len(w) * len(qs), 8), np.int32)
    q3_k_lanes_kernel(simd)(w, qs.astype(q8_dtype), got)
    np.testing.assert_array_equal(got.reshape(len(w), len(qs), 8), want, err_msg=f"Q3_K lanes, simd={simd} (exact)")


@pytest.mark.parametrize("simd", SIMDS, ids=str)
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K], ids=lambda t: t.name)
def test_k45_block_sums(simd, qtype):
    """The exact int32 sums of scale * q * x8 and of min * 32-sum over a block."""
    five = qtype == T.Q5_K
    w = blocks(176 if five else 144, 40, seed=3)
    qs = q8(12, seed=4)
    sc, mn = GQ4_K.get_scale_min(w[:, 4:16].copy())
    nib = w[:, -128:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (nib & 15).reshape(-1, 8, 32).astype(np.int64)
    if five:  # bit j of qh[l] is the 5th bit of element l of sub-block j
        q += ((w[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1) * 16
    iw = (sc.astype(np.int64)[:, :, None] * q).reshape(len(w), 256)
    sumi = iw @ qs.T.astype(np.int64)
    s32 = qs.astype(np.int64).reshape(len(qs), 8, 32).sum(axis=2)
    summ = mn.astype(np.int64) @ s32.T
    got = np.zeros((len(w) * len(qs), 2), np.int32)
    k45_kernel(five, simd)(w, qs, s32.astype(np.int32), got)
    got = got.reshape(len(w), len(qs), 2)
    np.testing.assert_array_equal(got[..., 0], sumi, err_msg=f"{qtype.name} sum of scale * q * x8, simd={simd} (exact)")
    np.testing.assert_array_equal(got[..., 1], summ, err_msg=f"{qtype.name} sum of min * 32-sum, simd={simd} (exact)")


def q6_k_sums_kernel(simd):
    @intrinsic
    def isum(typingctx, w, r, o, qs, t, qo, bsums, t2, bo, out, k, ko):  # out[k, ko] <- the block's exact sum
        def codegen(context, builder, sig, args):
            wp, qp, bp, op = (row_ptr(context, builder, sig, args, i) for i in (0, 3, 6, 9))
            builder.store(sums_q6_k(Vec(builder, simd), wp, qp, bp, sig.args[3].dtype), op)
            return context.get_dummy_value()
        if c_matrix(w, qs, bsums, out) and out.dtype == types.int32:
            return types.void(w, r, o, qs, t, qo, bsums, t2, bo, out, k, ko), codegen

    @njit
    def run(w, qs, bsums, out):  # out i32[n_w, n_x]
        for r in range(w.shape[0]):
            for t in range(qs.shape[0]):
                isum(w, r, 0, qs, t, 0, bsums, t, 0, out, r, t)
    return run


@pytest.mark.parametrize("simd", SIMDS, ids=str)
@pytest.mark.parametrize("q8_dtype", [np.int8, np.int16], ids=["i8", "i16"])
def test_q6_k_block_sums(simd, q8_dtype):
    """sums_q6_k: the exact int32 sum of scale * (q - 32) * x8 over a block, every instruction set."""
    w = blocks(210, 40, seed=8)
    w[:, 208:210] = ONE_F16  # d = 1: gguf-py's dequantize gives the integer weights scale * (q - 32) exactly
    qs = q8(12, seed=9)
    iw = gguf_dequantize(w, T.Q6_K).reshape(-1, 256).astype(np.int64)
    want = iw @ qs.T.astype(np.int64)
    bsums = qs.astype(np.int32).reshape(len(qs), 16, 16).sum(axis=2, dtype=np.int32)
    got = np.zeros((len(w), len(qs)), np.int32)
    q6_k_sums_kernel(simd)(w, qs.astype(q8_dtype), bsums, got)
    np.testing.assert_array_equal(got, want, err_msg=f"Q6_K block sums, simd={simd} (exact)")


@pytest.mark.reference
@pytest.mark.parametrize("qtype", [T.Q3_K], ids=lambda t: t.name)
@pytest.mark.parametrize("n_cols", [2048, 9728])  # rows under and over 4 KiB
def test_matvec_bit_identical_to_ggml_vec_dot(qtype, n_cols):
    """Q3_K follows the float steps of ggml's AVX2 vec_dot_q3_K_q8_K (plain, not repacked, weights)."""
    import llama_cpp  # noqa: F401  (GgmlMatvec loads its libggml)
    from benchmarks._common import GgmlMatvec
    qt = quant_type(qtype)
    n_rows = 47  # odd: two threads' row chunks differ
    rng = np.random.default_rng(5)
    w = rng.integers(0, 256, (n_rows, n_cols // 256, qt.type_size), dtype=np.uint8)
    for off in {T.Q3_K: (108,), T.Q4_K: (0, 2)}[qtype]:  # finite fp16 scales of both signs
        w[..., off:off + 2] = np.float16(rng.uniform(-0.02, 0.02, (n_rows, n_cols // 256, 1))).view(np.uint8)
    w = w.reshape(n_rows, -1)
    x = (rng.standard_normal(n_cols) * rng.uniform(0.01, 10, n_cols)).astype(np.float32)
    ggml = GgmlMatvec.create(int(qtype), [w], x)
    try:
        ggml.run(0, 1)
        want = ggml.result(0)
    finally:
        ggml.close()
    got = np.empty(n_rows, np.float32)
    qt.matvec_into(got, x, w)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32),
                                  err_msg=f"{qtype.name} vs ggml (bit-identical)")


def test_q4_k_prepared_activation_is_int8_with_32_sums():
    """Q4_K/Q5_K read Q8_K quants as int8 (maddubs) with sums over 32: the pairs of Q8_K's 16-sums."""
    x = np.random.default_rng(6).standard_normal((2, 512)).astype(np.float32)
    qs, d8, bs32 = quant_type(T.Q4_K).prepare(x)
    qs16, d16, bs16 = q8_k_activation(x)
    assert qs.dtype == np.int8 and (qs == qs16).all() and (d8 == d16).all(), "Q4_K activation: Q8_K quants and scales"
    np.testing.assert_array_equal(bs32, qs.astype(np.int32).reshape(2, -1, 32).sum(axis=2), err_msg="32-sums (exact)")
    fused = quant_type(T.Q4_K).kernels[4].py_func.__globals__["prep"]  # the matvec_x kernel's own conversion
    assert all((a == b).all() for a, b in zip(fused(x), (qs, d8, bs32))), "fused matvec's activation"


@pytest.mark.parametrize("qtype", [T.Q3_K, T.Q4_K, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
def test_fused_matvec_checks_and_fallback(qtype):
    """matvec_into's one-call kernel (FusedMatvec) gives the prepared path's bits; other layouts take the
    general path (same result, no new compilation), and shapes that do not fit get its error."""
    qt = quant_type(qtype)
    rng = np.random.default_rng(7)
    n_rows, n_cols = 40, 512
    w = rng.integers(0, 256, (n_rows, qt.row_bytes(n_cols)), dtype=np.uint8)
    blk = w.reshape(n_rows, -1, qt.type_size)
    off = {T.Q3_K: 108, T.Q4_K: 0, T.Q6_K: 208, T.Q8_0: 0}[qtype]
    blk[..., off:off + 2] = ONE_F16
    if qtype == T.Q4_K:
        blk[..., 2:4] = ONE_F16
    x = rng.standard_normal(2 * n_cols).astype(np.float32)
    want = np.empty((1, n_rows), np.float32)
    qt.matmul_prepared_into(want, qt.prepare(x[None, :n_cols].copy()), w)
    got = np.empty(n_rows, np.float32)
    qt.matvec_into(got, x[:n_cols], w)
    np.testing.assert_array_equal(got, want[0], err_msg="fused path")
    strided = np.empty(n_rows, np.float32)
    view = np.zeros(2 * n_cols, np.float32)
    view[::2] = x[:n_cols]
    qt.matvec_into(strided, view[::2], w)  # non-contiguous x: the general path
    np.testing.assert_array_equal(strided, want[0], err_msg="general path (strided x)")
    assert len(type(qt)._matvec_x.signatures) == 1, "the fused kernel compiled a second signature"
    with pytest.raises(ValueError, match=qt.qtype.name):
        qt.matvec_into(np.empty(n_rows, np.float32), x[:n_cols - qt.block_size], w)


@njit
def _take_all(order, n_items, n_par):
    """Items taken in turn by the threads listed in order (-1 once a thread gets none), serially."""
    counters = work_counters(n_par)
    got = []
    for t in order:
        got.append(take_item(counters, t, n_items, n_par))
    return got


@njit(parallel=True)
def _take_parallel(n_items, n_par):
    seen = np.zeros(n_items, np.int64)
    counters = work_counters(n_par)
    for t in prange(n_par):
        i = take_item(counters, t, n_items, n_par)
        while i >= 0:
            seen[i] += 1
            i = take_item(counters, t, n_items, n_par)
    return seen


def test_take_item_own_range_then_the_others():
    """common.take_item: thread t runs through its own contiguous share in order, then takes what is left of
    the others' shares; every item goes out once."""
    def take(order, n_items, n_par):
        return list(_take_all(np.array(order), n_items, n_par))
    assert take([0, 1, 0, 1, 0, 1, 1, 1], 7, 2) == [0, 3, 1, 4, 2, 5, 6, -1]
    assert take([1] * 8, 7, 2) == [3, 4, 5, 6, 0, 1, 2, -1]  # thread 0 never came: 1 takes its share too
    assert take([2, 2, 0, 2, 2, 1], 5, 3) == [3, 4, 0, 1, 2, -1]  # shares 0 / 1-2 / 3-4
    for n_items, n_par in ((0, 2), (1, 2), (7, 2), (100, 3), (5, 8)):  # n_par above the pool size: still once each
        np.testing.assert_array_equal(_take_parallel(n_items, n_par), np.ones(n_items, np.int64))

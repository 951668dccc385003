"""Each CUDA kernel (localmoe.gpu) on numba-cuda's simulator at small shapes, against
the CPU kernels (localmoe.quant, localmoe.layers, route_topk) or numpy in float64."""
import numpy as np
import pytest
from cuda_sim import HARDWARE, enable
from gguf import GGMLQuantizationType as T

cuda = enable()

from localmoe.arch.base import route_topk  # noqa: E402
from localmoe.gpu import attention as gattn  # noqa: E402
from localmoe.gpu import ops, router  # noqa: E402
from localmoe.gpu.matvec import gathered_matvec  # noqa: E402
from localmoe.layers import Rope, apply_rope, attention, rms_norm, sigmoid  # noqa: E402
from localmoe.quant import quant_type  # noqa: E402
from localmoe.quant.api import matvec  # noqa: E402

QTYPES = [T.Q8_0, T.Q4_K, T.Q6_K, T.Q3_K, T.F16, T.F32]


def _weights(qt, n_rows, n_cols, rng):
    """(GGUF rows u8[n_rows, row_bytes], their f32 values) for random normal weights."""
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    if qt == T.F32:
        return w.view(np.uint8), w
    if qt == T.F16:
        return w.astype(np.float16).view(np.uint8), w.astype(np.float16).astype(np.float32)
    raw = quant_type(qt).quantize(w)
    deq = np.empty_like(w)
    quant_type(qt).dequantize_into(deq, raw)
    return raw, deq


def _dev(*arrays):
    return [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]


@pytest.mark.parametrize("qt", QTYPES, ids=lambda q: q.name)
def test_gathered_matvec_experts(qt):
    """mul_mat_id shape: 3 slots over a stack of 4 experts, two slots on one
    expert, x rows picked per slot (4 experts of 16x256). Against dequantize (bit-exact with gguf) @ x in float64:
    only the float32 summation order differs, so max |err| <= 1e-5 * max |ref|."""
    rng = np.random.default_rng(int(qt))
    n_exp, rows, cols = 4, 16, 256
    raw, deq = _weights(qt, n_exp * rows, cols, rng)
    x = rng.standard_normal((2, cols)).astype(np.float32)
    ids, xrow = np.array([3, 0, 3], np.int32), np.array([0, 1, 1], np.int32)
    out = cuda.device_array((3, rows), np.float32)
    gathered_matvec(qt, out, *_dev(x, raw, ids, xrow), rows)
    got = out.copy_to_host()
    ref = np.stack([deq.reshape(n_exp, rows, cols)[ids[s]].astype(np.float64) @ x[xrow[s]] for s in range(3)])
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    if qt in (T.Q8_0, T.Q4_K, T.Q6_K, T.Q3_K):
        # the CPU kernel quantizes x to Q8_0/Q8_K first (llama.cpp's vec_dot types): within 1% of max |ref|
        w3 = raw.reshape(n_exp, rows, -1)
        cpu = np.stack([matvec(w3[ids[s]], qt, (rows, cols), x[xrow[s]]) for s in range(3)])
        assert np.abs(got - cpu).max() <= 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("qt", [T.Q4_K, T.F16], ids=lambda q: q.name)
def test_gathered_matvec_batch_tiles(qt):
    """The prefill form: 19 slots sorted by matrix over a stack of 3 (9 rows of 512, not a
    multiple of the rows per block), so blocks take tiles of 8 slots (2 matrices in one tile,
    a partial last tile). Equals dequantize @ x rows within 1e-5 * max |ref|."""
    rng = np.random.default_rng(1)
    n_mat, rows, cols, n_slot = 3, 9, 512, 19
    raw, deq = _weights(qt, n_mat * rows, cols, rng)
    x = rng.standard_normal((7, cols)).astype(np.float32)
    ids = np.sort(rng.integers(0, n_mat, n_slot)).astype(np.int32)
    xrow = rng.integers(0, 7, n_slot).astype(np.int32)
    out = cuda.device_array((n_slot, rows), np.float32)
    gathered_matvec(qt, out, *_dev(x, raw, ids, xrow), rows)
    d3 = deq.reshape(n_mat, rows, cols).astype(np.float64)
    ref = np.stack([d3[ids[s]] @ x[xrow[s]] for s in range(n_slot)])
    assert np.abs(out.copy_to_host() - ref).max() <= 1e-5 * np.abs(ref).max()


def test_float_rows_not_multiple_of_block():
    """F32 weights with 40 columns (a partial last block of 32): exact to 1e-6 * max |ref|."""
    rng = np.random.default_rng(2)
    raw, w = _weights(T.F32, 6, 40, rng)
    x = rng.standard_normal((1, 40)).astype(np.float32)
    out = cuda.device_array((1, 6), np.float32)
    gathered_matvec(T.F32, out, *_dev(x, raw, np.zeros(1, np.int32), np.zeros(1, np.int32)), 6)
    ref = w.astype(np.float64) @ x[0]
    assert np.abs(out.copy_to_host()[0] - ref).max() <= 1e-6 * np.abs(ref).max()


def test_rms_norm():
    """RMS norm of 3 rows of 96 with a weight, as localmoe.layers.rms_norm: within 2 ulp-ish (rel 1e-6)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 96)) * 5).astype(np.float32)
    w = rng.standard_normal(96).astype(np.float32)
    dx, dw = _dev(x, w)
    ops.rms_norm(dx, dx, dw, 1e-6)
    ref = rms_norm(x, w, 1e-6)
    assert np.abs(dx.copy_to_host() - ref).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
def test_rope(neox):
    """RoPE on 3 tokens x 2 heads x 16 dims at positions 5..7 (n_rot 16): bit-identical to
    localmoe.layers.apply_rope (same float64 products, same single roundings)."""
    rng = np.random.default_rng(4)
    rope = Rope(n_rot=16, neox=neox, freq_base=10000.0, freq_scale=1.0, ext_factor=0.0, attn_factor=1.0,
                beta_fast=32.0, beta_slow=1.0, n_ctx_orig=64)
    cos, sin = rope.tables(16)
    x = rng.standard_normal((3, 2, 16)).astype(np.float32)
    dx, dc, ds = _dev(x, cos, sin)
    ops.rope(dx, dc, ds, 5, neox)
    ref = x.copy()
    apply_rope(ref, cos[5:8], sin[5:8], neox)
    assert np.array_equal(dx.copy_to_host(), ref)


def test_swiglu_add_weighted_sum_kv_store():
    """Element-wise kernels against numpy: silu(g) * u within rel 1e-6; add exact; per-token
    weighted slot sums within 1e-6 * max; the fp16 cache store equals numpy's f32->f16 rounding."""
    rng = np.random.default_rng(5)
    g, u = rng.standard_normal((2, 4, 24)).astype(np.float32)
    dg, du, dout = _dev(g, u, np.zeros_like(g))
    ops.swiglu(dout, dg, du)
    ref = g / (1 + np.exp(-g.astype(np.float64))) * u
    assert np.abs(dout.copy_to_host() - ref).max() <= 1e-6 * np.abs(ref).max()
    ops.add(dout, dg, du)
    assert np.array_equal(dout.copy_to_host(), g + u)
    y = rng.standard_normal((5, 24)).astype(np.float32)
    start, wts = np.array([0, 2, 2, 5], np.int32), rng.random(5).astype(np.float32)
    perm = np.array([3, 0, 4, 1, 2], np.int32)
    base = rng.standard_normal((3, 24)).astype(np.float32)
    dbase = cuda.to_device(base)
    ops.weighted_sum(dbase, *_dev(y, perm, start, wts))
    yp = y[perm]
    ref = base + np.stack([(yp[start[t]:start[t + 1]] * wts[start[t]:start[t + 1], None]).sum(0) for t in range(3)])
    assert np.abs(dbase.copy_to_host() - ref).max() <= 1e-6 * np.abs(ref).max()
    cache = cuda.to_device(np.zeros((8, 2, 12), np.float16))
    kv = rng.standard_normal((3, 2, 12)).astype(np.float32)
    ops.kv_store(cache, cuda.to_device(kv), 4)
    host = cache.copy_to_host()
    assert np.array_equal(host[4:7], kv.astype(np.float16)) and not host[:4].any() and not host[7:].any()


def test_attention_gqa():
    """Causal GQA attention (4 heads over 2 KV heads, 3 new tokens after 4 cached) against
    localmoe.layers.attention (q and probabilities rounded to fp16 as there): rel 1e-3 of max,
    the fp16 probability rounding flipping on a near-tie being the only expected difference."""
    rng = np.random.default_rng(6)
    n_ctx, n_head, n_kv, hd, p0, n_tok = 10, 4, 2, 16, 4, 3
    kc = rng.standard_normal((n_ctx, n_kv, hd)).astype(np.float16)
    vc = rng.standard_normal((n_ctx, n_kv, hd)).astype(np.float16)
    q = rng.standard_normal((n_tok, n_head, hd)).astype(np.float32)
    out = cuda.device_array((n_tok, n_head, hd), np.float32)
    p = cuda.device_array((n_tok, n_head, n_ctx), np.float32)
    gattn.attention(out, p, *_dev(q, kc, vc), p0, 0.25)
    ref = attention(q, kc, vc, p0, 0.25).reshape(n_tok, n_head, hd)
    assert np.abs(out.copy_to_host() - ref).max() <= 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("gating,norm,scale", [("softmax", True, 0.0), ("softmax", False, 2.5),
                                               ("sigmoid", True, 1.0)])
def test_route_topk(gating, norm, scale):
    """Top-3 of 8 experts for 4 tokens (one with a tie, which goes to the lower id): ids equal
    route_topk's, weights within rel 1e-6."""
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((4, 8)).astype(np.float32) * 2
    logits[2, 5] = logits[2, 1]
    ids, wts = cuda.device_array((4, 3), np.int32), cuda.device_array((4, 3), np.float32)
    scratch = (cuda.device_array((4, 8), np.float32), cuda.device_array((4, 8), np.float32),
               cuda.device_array((4, 1), np.float32))
    router.route(ids, wts, scratch, cuda.to_device(logits), cuda.device_array(0, np.float32), gating, norm, scale)
    ref_ids, ref_w = route_topk(logits, 3, gating, norm, scale)
    assert np.array_equal(ids.copy_to_host(), ref_ids)
    assert np.abs(wts.copy_to_host() - ref_w).max() <= 1e-6 * np.abs(ref_w).max()


@pytest.mark.parametrize("gating,bias,groups,norm,scale", [
    ("sigmoid", True, (4, 2), True, 2.5),    # DeepSeek-V3: bias + groups, renormalised, scaled
    ("softmax", False, (4, 2), False, 16.0),  # DeepSeek-V2: groups only
    ("sigmoid", True, (1, 0), False, 1.0)])   # bias alone
def test_route_bias_groups(gating, bias, groups, norm, scale):
    """DeepSeek-V2/V3 selection (exp_probs_b bias, group-limited top-k; weights the unbiased
    probabilities) for 5 tokens over 16 experts, k=4, one token with a tied group score:
    ids equal localmoe.arch.deepseek2.route's, weights within rel 1e-6."""
    from types import SimpleNamespace

    from localmoe.arch.deepseek2 import route as cpu_route
    rng = np.random.default_rng(8)
    n_tok, n_exp, k = 5, 16, 4
    logits = (rng.standard_normal((n_tok, n_exp)) * 2).astype(np.float32)
    logits[3, 4:8] = logits[3, 8:12]  # groups 1 and 2 of token 3 score the same: the lower one wins
    b = (rng.standard_normal(n_exp) * 0.3).astype(np.float32) if bias else None
    a = SimpleNamespace(n_expert_used=k, gating=gating, expert_weights_norm=norm, expert_weights_scale=scale,
                        n_group=groups[0], n_group_used=groups[1])
    ref_ids, ref_w = cpu_route(logits, b, a)
    ids, wts = cuda.device_array((n_tok, k), np.int32), cuda.device_array((n_tok, k), np.float32)
    scratch = (cuda.device_array((n_tok, n_exp), np.float32), cuda.device_array((n_tok, n_exp), np.float32),
               cuda.device_array((n_tok, groups[0]), np.float32))
    router.route(ids, wts, scratch, cuda.to_device(logits),
                 cuda.to_device(b) if bias else cuda.device_array(0, np.float32), gating, norm, scale,
                 groups[1] if groups[0] > 1 else 0)
    assert np.array_equal(ids.copy_to_host(), ref_ids)
    assert np.abs(wts.copy_to_host() - ref_w).max() <= 1e-6 * np.abs(ref_w).max()


def test_mla_views_copy_gate():
    """What MLA and the shared experts add: the per-head absorbed matvec on strided column views
    (x = q's first 16 of 24 columns per (token, head) slot, out = the first 8 of 12 columns),
    within 1e-5 of max against numpy in float64; copy3 between views exact; kv_store of a
    one-head x into every head of a cache column view, exact fp16; add_gated = out + y *
    sigmoid(g) within rel 1e-6."""
    rng = np.random.default_rng(9)
    n_tok, nh, rank = 3, 2, 8
    w = rng.standard_normal((nh * rank, 16)).astype(np.float16)  # (heads x rank) rows of 16 (nope)
    q = rng.standard_normal((n_tok * nh, 24)).astype(np.float32)
    dq, dw = _dev(q, w.view(np.uint8))
    dout = cuda.to_device(np.zeros((n_tok * nh, 12), np.float32))
    heads = np.tile(np.arange(nh, dtype=np.int32), n_tok)
    gathered_matvec(T.F16, dout[:, :rank], dq[:, :16], dw, *_dev(heads, np.arange(n_tok * nh, dtype=np.int32)), rank)
    got = dout.copy_to_host()
    w3 = w.astype(np.float64).reshape(nh, rank, 16)
    ref = np.stack([w3[heads[s]] @ q[s, :16] for s in range(n_tok * nh)])
    assert np.abs(got[:, :rank] - ref).max() <= 1e-5 * np.abs(ref).max() and not got[:, rank:].any()
    ops.copy3(dout.reshape(n_tok, nh, 12)[:, :, rank:], dq.reshape(n_tok, nh, 24)[:, :, 16:20])
    moved = dout.copy_to_host().reshape(n_tok, nh, 12)[:, :, rank:]
    assert np.array_equal(moved, q.reshape(n_tok, nh, 24)[:, :, 16:20])
    cache = cuda.to_device(np.zeros((6, nh, 10), np.float16))
    kpe = rng.standard_normal((n_tok, 1, 4)).astype(np.float32)
    ops.kv_store(cache[:, :, 6:], cuda.to_device(kpe), 2)
    host = cache.copy_to_host()
    assert np.array_equal(host[2:5, :, 6:], np.broadcast_to(kpe.astype(np.float16), (n_tok, nh, 4)))
    assert not host[:, :, :6].any() and not host[:2].any() and not host[5:].any()
    base, y, g = (rng.standard_normal(s).astype(np.float32) for s in ((n_tok, 20), (n_tok, 20), (n_tok, 1)))
    dbase = cuda.to_device(base)
    ops.add_gated(dbase, *_dev(y, g))
    ref = base + y * sigmoid(g)
    assert np.abs(dbase.copy_to_host() - ref).max() <= 1e-6 * np.abs(ref).max()


def test_hardware_launch_shapes():
    """The tests above run with the simulator's small blocks (LAUNCH 2 x 8); this reruns the
    matvec, norm, attention and routing tests in a child process with the GPU's (32 threads
    a row, 4 rows a block: 128-thread blocks and 5-step shared-memory trees)."""
    import os
    import subprocess
    import sys
    if HARDWARE:
        pytest.skip("on a GPU the tests above already use the hardware shapes")
    env = {**os.environ, "LOCALMOE_CUDA_LAUNCH": "32,4"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "(experts and Q4_K) or (tiles and Q4_K) or rms_norm or attention or (route and sigmoid) "
                        "or mla"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "8 passed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def _cuda_home():
    import glob
    import os
    for home in [os.environ.get("CUDA_HOME", "")] + sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if home and glob.glob(f"{home}/lib*/libnvvm.so*") and glob.glob(f"{home}/nvvm/libdevice/libdevice*.bc"):
            return home
    return None


@pytest.mark.skipif(_cuda_home() is None, reason="no CUDA toolkit (libnvvm, libdevice) to compile with")
def test_kernels_compile_to_ptx():
    """The simulator never types the kernels; NVVM does: every kernel (each matvec type at tile 1
    and TILE, with the hardware launch shapes) compiles to sm_80 PTX, in a child process
    without the simulator."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "LOCALMOE_CUDA_LAUNCH")}
    env["CUDA_HOME"] = _cuda_home()
    r = subprocess.run([sys.executable, str(__import__("pathlib").Path(__file__).with_name("cuda_ptx.py"))],
                       capture_output=True, text=True, env=env, timeout=600)
    n_ok = sum(line.startswith("ok ") for line in r.stdout.splitlines())
    assert r.returncode == 0 and n_ok == 24, r.stdout + r.stderr[-3000:]

"""A whole micro MoE model through the GPU runner on numba-cuda's simulator, at GPU budgets
of 0%, 50% and 100% of the expert bytes, against the CPU path of the same file; and one micro
model per architecture variant the runner supports beyond the skeleton (shared experts, leading
dense layers, MLA, DeepSeek-V3 routing) at a budget where VRAM and CPU experts share a step.

The device kernels multiply f32 activations (as llama.cpp's CUDA dequantize paths do),
while the CPU kernels first convert x to the weight's vec_dot type (fp16 for F16, Q8_0
for Q8_0). So F16 weights agree to fp16 rounding of the activations, and Q8_0 weights to
8-bit activation rounding; a wrong expert, weight or missing partial sum is off by O(1).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from cuda_sim import HARDWARE, enable, micro_model
from gguf import GGMLQuantizationType as T

cuda = enable()

import localmoe  # noqa: E402

TOKENS = [1, 5, 9, 3]


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("cuda") / "micro-f16.gguf", qtype=T.F16)


def _run(path, **kw):
    """Prefill logits of TOKENS, then one decode step's logits (KV cache in use)."""
    with localmoe.load(path, n_ctx=32, **kw) as m:
        pre, step = m.eval(TOKENS), m.forward([7])
        stats = None if m.gpu is None else m.gpu.stats()
    return pre, step, stats


@pytest.mark.parametrize("budget", ["0%", "50%", "100%"])
def test_gpu_budget_matches_cpu_f16(f16_model, budget):
    """F16 micro qwen3moe: prefill and decode logits within 2e-3 of max |logit| of the CPU
    path's (fp16 activation rounding gives ~8e-4 here). At 50% both sides ran experts."""
    ref_pre, ref_step, _ = _run(f16_model)
    pre, step, st = _run(f16_model, gpu_budget=budget)
    assert np.abs(pre - ref_pre).max() <= 2e-3 * np.abs(ref_pre).max()
    assert np.abs(step - ref_step).max() <= 2e-3 * np.abs(ref_step).max()
    slots = st["gpu_plan"]["slots"]["0"]
    assert slots == {"0%": 0, "50%": 2, "100%": 4}[budget]
    if budget == "0%":
        assert st["gpu_pairs"] == 0 and st["cpu_pairs"] == 10  # 5 tokens x 2 experts
    elif budget == "100%":
        assert st["cpu_pairs"] == 0 and st["gpu_pairs"] == 10
    else:
        assert st["gpu_pairs"] > 0 and st["cpu_pairs"] > 0


def test_gpu_q8_0_model(tmp_path):
    """Q8_0 micro model at 50%: within 5e-2 of max |logit| of the CPU path (the CPU
    quantizes activations to Q8_0 at every matmul: 1-2% here); the greedy pick agrees."""
    path = micro_model(tmp_path / "micro-q8.gguf", qtype=T.Q8_0)
    ref_pre, ref_step, _ = _run(path)
    pre, step, _ = _run(path, gpu_budget="50%")
    assert np.abs(pre - ref_pre).max() <= 5e-2 * np.abs(ref_pre).max()
    assert np.abs(step - ref_step).max() <= 5e-2 * np.abs(ref_step).max()
    assert step.argmax() == ref_step.argmax()


def test_gpu_budget_below_dense_part(f16_model):
    """A budget below the dense part is refused with the minimum in bytes."""
    from localmoe.planner.gpu import GpuBudgetTooSmallError
    with pytest.raises(GpuBudgetTooSmallError, match=r"below the dense part .*\(\d+ bytes\)"):
        localmoe.load(f16_model, n_ctx=32, gpu_budget=1000)


def test_no_driver_is_a_clear_error(f16_model):
    """Without the simulator and with no NVIDIA driver here, --device cuda is an `error:` line,
    exit 1, no traceback; the CPU path imports nothing from numba.cuda."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", "from localmoe.cli import main; main()", "run", str(f16_model),
                        "-p", "t1", "-n", "1",
                        "--device", "cuda"], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode == 0:
        pytest.skip("a CUDA device is present here")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert "CUDA" in r.stderr
    code = ("import sys, localmoe; m = localmoe.load(sys.argv[1], n_ctx=32); m.eval([1, 2]); "
            "print(sorted(k for k in sys.modules if k.startswith(('numba.cuda', 'numba_cuda', 'localmoe.gpu'))))")
    r = subprocess.run([sys.executable, "-c", code, str(f16_model)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# arch, models.archs variant, widths: micro versions of the tiny configs (models.archs' layout, keys and
# routing config; 2 layers, n_embd 32, 8 experts of width 32, 2 used, MLA heads nope/rope/v 16, rank 32)
VARIANTS = {
    "qwen2moe": ("qwen2moe", None, dict(n_ff_exp=32, n_ff_shexp=64, n_head_kv=1)),
    "deepseek": ("deepseek", None, dict(n_ff_exp=32, n_shared=2, n_lead=1)),
    "deepseek2-v2-lite": ("deepseek2", "v2-lite", dict(n_ff_exp=32, n_shared=2, n_lead=1, kv_lora=32, q_lora=0)),
    "deepseek2-v2": ("deepseek2", "v2", dict(n_ff_exp=32, n_shared=2, n_lead=1, kv_lora=32, q_lora=32,
                                             groups=(4, 2))),
    "deepseek2-v3": ("deepseek2", "v3", dict(n_ff_exp=32, n_shared=1, n_lead=1, kv_lora=32, q_lora=32,
                                             groups=(4, 2))),
    "deepseek2-v2-lite-kvb": ("deepseek2", "v2-lite-kvb", dict(n_ff_exp=32, n_shared=2, n_lead=1, kv_lora=32,
                                                               q_lora=0)),
}
MICRO = dict(n_embd=32, n_head=2, n_head_kv=2, head_dim=16, n_ff=32, n_layer=2, n_expert=8, n_used=2, n_vocab=32)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gpu_arch_variants(tmp_path, name):
    """F16 micro models at 25% (2 of 8 expert slots a layer): the prefill (3 tokens, one step
    per layer) ran experts both in VRAM and on the CPU; prefill and decode logits within 3e-3 of
    max |logit| of the CPU path (the CPU rounds activations to fp16 for F16 weights: 0.6-1.6e-3
    seen here); the greedy pick of every row agrees where the CPU's top-2 margin exceeds twice that."""
    arch, variant, widths = VARIANTS[name]
    path = micro_model(tmp_path / f"{name}.gguf", arch=arch, qtype=T.F16, variant=variant, **{**MICRO, **widths})
    toks = TOKENS[:3]
    with localmoe.load(path, n_ctx=16) as m:
        ref_pre, ref_step = m.eval(toks), m.forward([7])
    with localmoe.load(path, n_ctx=16, gpu_budget="25%") as m:
        pre = m.eval(toks)
        st = m.gpu.stats()
        step = m.forward([7])
    assert st["gpu_pairs"] > 0 and st["cpu_pairs"] > 0, st
    tol = 3e-3
    for got, ref in ((pre, ref_pre), (step, ref_step)):
        bound = tol * np.abs(ref).max()
        assert np.abs(got - ref).max() <= bound
        top2 = np.sort(ref, axis=-1)[:, -2:]
        robust = top2[:, 1] - top2[:, 0] > 2 * bound
        assert np.array_equal(got.argmax(-1)[robust], ref.argmax(-1)[robust])


@pytest.mark.skipif(not HARDWARE, reason="GPU only (LOCALMOE_CUDA_HW=1): a real vocabulary's output head takes "
                                         "minutes on the simulator")
@pytest.mark.parametrize("arch,variant", [("qwen2moe", None), ("deepseek", None), ("deepseek2", "v2-lite"),
                                          ("deepseek2", "v2"), ("deepseek2", "v3"), ("deepseek2", "v2-lite-kvb")])
def test_gpu_tiny_models(arch, variant):
    """models.build's tiny F16 models (real vocabularies) at 50%: prefill and decode logits within
    3e-3 of max |logit| of the CPU path, both sides ran experts, and 8 greedy tokens agree."""
    from models.build import cached_model
    path = cached_model(arch, "tiny", "f16", variant)
    ref_pre, ref_step, _ = _run(path)
    pre, step, st = _run(path, gpu_budget="50%")
    assert np.abs(pre - ref_pre).max() <= 3e-3 * np.abs(ref_pre).max()
    assert np.abs(step - ref_step).max() <= 3e-3 * np.abs(ref_step).max()
    assert st["gpu_pairs"] > 0 and st["cpu_pairs"] > 0
    greedy = []
    for kw in ({}, {"gpu_budget": "50%"}):
        with localmoe.load(path, n_ctx=32, **kw) as m:
            greedy.append([int(t) for t in m.generate_tokens(TOKENS, max_tokens=8, temperature=0.0)])
    assert greedy[0] == greedy[1]


@pytest.mark.skipif(not HARDWARE, reason="GPU only (LOCALMOE_CUDA_HW=1): minutes per model on the simulator")
@pytest.mark.parametrize("arch", ["qwen3moe", "olmoe", "llama"])
@pytest.mark.parametrize("qtype", [T.F16, T.Q4_K, T.Q6_K, T.Q3_K], ids=lambda q: q.name)
def test_gpu_k_quant_models(tmp_path, arch, qtype):
    """n_embd 256 micro models of three architectures (K-quant rows), 2 layers, 8 experts (4 used),
    at 50%: within 1e-1 of max |logit| of the CPU path (F16: 2e-3). The CPU side rounds every
    activation to Q8_K; 1-layer versions on the simulator differed by 1.4-3.7% (one-off run)."""
    path = micro_model(tmp_path / f"{arch}-{qtype.name}.gguf", arch=arch, qtype=qtype, n_embd=256, n_layer=2,
                       n_expert=8, n_used=4, n_head=4, n_head_kv=2, head_dim=64, n_vocab=512)
    ref_pre, ref_step, _ = _run(path)
    pre, step, st = _run(path, gpu_budget="50%")
    tol = 2e-3 if qtype == T.F16 else 1e-1
    assert np.abs(pre - ref_pre).max() <= tol * np.abs(ref_pre).max()
    assert np.abs(step - ref_step).max() <= tol * np.abs(ref_step).max()
    assert st["gpu_pairs"] > 0 and st["cpu_pairs"] > 0


def test_vram_tier_lfu_moves(f16_model):
    """The VRAM slots follow LFU with decay: after expert 3 and 1 are picked step after step,
    they hold the 2 slots (moved in through the pinned ring on the copy stream), each slot's
    device bytes equal that expert's GGUF rows, and an expert picked once does not evict them."""
    with localmoe.load(f16_model, n_ctx=32, gpu_budget="50%") as m:
        tier = m.gpu.experts
        for _ in range(5):
            tier.fill_free(0, np.array([[0, 2]], np.int32))
            tier.update(0, np.array([[3, 1]], np.int32))
        assert sorted(np.flatnonzero(tier.resident(0) >= 0).tolist()) == [1, 3] and tier.moves == 2
        assert 0 in tier.pending  # the evictions went on the copy stream; the next step waits for them
        tier.ready(0, m.gpu.st)
        assert 0 not in tier.pending
        tier.update(0, np.array([[0, 2]], np.int32))
        assert sorted(np.flatnonzero(tier.resident(0) >= 0).tolist()) == [1, 3] and tier.moves == 2
        for (il, name), dev in tier.stacks.items():
            r, host = tier.rows[il, name], dev.copy_to_host()
            for e in (1, 3):
                s = tier.resident(il)[e]
                assert np.array_equal(host[s * r:(s + 1) * r], tier.src[il, name][e])


def test_set_expert_used_on_gpu(f16_model):
    """set_expert_used(1) on the device path gives the CPU path's k=1 logits (2e-3 of max);
    raising k past what the device buffers hold is a clear UnsupportedError."""
    from localmoe.errors import UnsupportedError
    with localmoe.load(f16_model, n_ctx=32) as m:
        m.set_expert_used(1)
        ref = m.eval(TOKENS[:2])
    with localmoe.load(f16_model, n_ctx=32, gpu_budget="100%") as m:
        m.set_expert_used(1)
        got = m.eval(TOKENS[:2])
        m.set_expert_used(3)
        with pytest.raises(UnsupportedError, match="load with n_expert_used=3"):
            m.eval(TOKENS[:1])
    assert np.abs(got - ref).max() <= 2e-3 * np.abs(ref).max()

"""numba-cuda's simulator for the GPU tests (tests/test_cuda_*.py).

`enable()` switches numba.cuda to the simulator (NUMBA_ENABLE_CUDASIM=1) before anything
imports numba.cuda in this process; the CPU path never imports it, so the rest of the suite
is unaffected. numba-cuda is in the test extra: without it these tests fail (no skip).

LOCALMOE_CUDA_HW=1 runs the same tests on a real GPU instead (benchmarks/gpu_device.sh),
with the hardware launch shapes, plus the tests too slow for the simulator (`HARDWARE`).
"""
import os
import sys


HARDWARE = os.environ.get("LOCALMOE_CUDA_HW") == "1"


def enable():
    """numba.cuda as the simulator (or the GPU with LOCALMOE_CUDA_HW=1). The environment variable
    is restored afterwards, so that child processes started by other tests do not inherit it."""
    import numba
    if HARDWARE:
        from numba import cuda
        assert cuda.is_available() and not numba.core.config.ENABLE_CUDASIM, "LOCALMOE_CUDA_HW=1 needs a GPU"
        return cuda
    if "numba.cuda" in sys.modules and not numba.core.config.ENABLE_CUDASIM:
        raise RuntimeError("numba.cuda was imported before the simulator was enabled")
    saved = os.environ.get("NUMBA_ENABLE_CUDASIM")
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    try:
        numba.core.config.reload_config()
        from numba import cuda
    finally:
        if saved is None:
            del os.environ["NUMBA_ENABLE_CUDASIM"]
        else:
            os.environ["NUMBA_ENABLE_CUDASIM"] = saved
    assert cuda.is_available()  # the simulator is always available
    return cuda


def micro_model(path, arch: str = "qwen3moe", qtype=None, n_vocab: int = 64, n_embd: int = 64,
                variant: str | None = None, mla: tuple = (16, 16, 16), **hyper):
    """Write a random micro MoE GGUF small enough for the simulator (a real vocabulary's
    output head is too slow there): 1 layer, n_embd 64, 4 experts of 64 x 64, 2 used, Q8_0
    matrices (as localmoe's quantizer writes them), F32 norms and router, a stub vocabulary.
    The layout is models.archs' (as cached_model's), for `variant`'s config (deepseek2: gating,
    scale, norm, YaRN mscale; "-kvb": the legacy attn_kv_b form); hyper overrides the widths, mla
    the MLA head dims (q/k nope, rope, v; the configs' real 128/64/128 are too slow here)."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T

    from localmoe.quant import quant_type
    from models import archs
    from models.build import _value_type

    qtype = T.Q8_0 if qtype is None else T(qtype)
    h = dict(n_embd=n_embd, n_head=2, n_head_kv=1, head_dim=32, n_ff=n_embd, n_ff_exp=n_embd, n_expert=4,
             n_used=2, n_layer=1)
    h.update(hyper)
    s = archs.Spec(arch=arch, vocab="none")
    s.keys.update({"context_length": 256, "embedding_length": h["n_embd"], "block_count": h["n_layer"],
                   "feed_forward_length": h["n_ff"], "attention.head_count": h["n_head"],
                   "attention.head_count_kv": h["n_head_kv"], "rope.freq_base": 10000.0,
                   "attention.layer_norm_rms_epsilon": 1e-6, "expert_count": h["n_expert"],
                   "expert_used_count": h["n_used"]})
    base, kvb = archs.resolve(arch, variant)
    archs.BUILDERS[arch](s, h, n_vocab, {**archs.CONFIGS[arch, base], "mla": tuple(mla)}, kvb)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch=arch)
    for k, v in s.keys.items():
        w.add_key_value(f"{arch}.{k}", v, _value_type(v))
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(n_vocab)])
    w.add_token_types([1] * n_vocab)
    for t in s.tensors:
        shape = tuple(reversed(t.ne))
        if t.init == "norm":
            a = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif t.init == "probs_b":  # DeepSeek-V3's selection bias: large enough to change some picks
            a = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        elif t.init == "router":
            a = (2 * rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        else:
            a = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        if len(shape) == 1 or t.init in ("norm", "router", "bias"):
            w.add_tensor(t.name, a)
            continue
        raw = quant_type(qtype).quantize(a.reshape(-1, shape[-1]))
        w.add_tensor(t.name, raw.reshape(shape[:-1] + (raw.shape[-1],)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""The GPU tier's plan (localmoe.planner.gpu) and its CLI, which need no CUDA."""
import json

import pytest
from click.testing import CliRunner
from cuda_sim import micro_model

import localmoe
from localmoe.arch import arch_module
from localmoe.cli import main
from localmoe.errors import LocalMoEError
from localmoe.gguf_file import open_gguf
from localmoe.planner.gpu import GpuBudgetTooSmallError, gpu_plan

N_CTX = 32


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("gpuplan") / "micro.gguf", n_layer=2)


def _plan(path, budget):
    with open_gguf(path) as gf:
        args = arch_module(gf.arch).ModelArgs.from_gguf(gf)
        return gpu_plan(gf, args, N_CTX, budget), gf.tensors["token_embd.weight"].n_bytes


def test_dense_part_and_slots(micro):
    """Dense part = non-expert tensors but token_embd + fp16 KV + device buffers; the shares
    0/50/100% give 0/2/4 of 4 experts in each of the 2 layers; one byte less than the minimum
    is refused with the minimum in bytes, exactly at it is 0 slots."""
    p, emb = _plan(micro, "0%")
    fp = p.fp
    assert p.weight_bytes == fp.non_expert_bytes - emb and p.kv_bytes == fp.kv_bytes == 2 * N_CTX * 1 * 64 * 2
    assert p.minimum_bytes == p.weight_bytes + p.kv_bytes + p.scratch_bytes and p.budget == p.minimum_bytes
    assert [_plan(micro, s)[0].slots for s in ("0%", "50%", "100%")] == [{0: 0, 1: 0}, {0: 2, 1: 2}, {0: 4, 1: 4}]
    assert _plan(micro, p.minimum_bytes)[0].slots == {0: 0, 1: 0}
    one = fp.layers[0].expert_bytes
    assert _plan(micro, p.minimum_bytes + 3 * one)[0].slots == {0: 2, 1: 1}  # remainder from the first layer
    with pytest.raises(GpuBudgetTooSmallError, match=rf"below the dense part .*\({p.minimum_bytes} bytes\)"):
        _plan(micro, p.minimum_bytes - 1)
    with pytest.raises(LocalMoEError, match="0..100%"):
        _plan(micro, "150%")


def test_cli_plan_gpu_column(micro):
    """`localmoe plan --gpu-budget` prints the VRAM part and a GPU column beside the RAM slots;
    --json carries it under "gpu"; a budget below the dense part is `error:`, exit 1."""
    r = CliRunner().invoke(main, ["plan", str(micro), "--ram-budget", "1G", "--gpu-budget", "50%",
                                  "--ctx", str(N_CTX)])
    assert r.exit_code == 0, r.output
    assert "GPU budget" in r.output and "layer   1:    4 slots x" in r.output and "GPU    2" in r.output
    r = CliRunner().invoke(main, ["plan", str(micro), "--gpu-budget", "100%", "--ctx", str(N_CTX), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["gpu"]["slots"] == {"0": 4, "1": 4}
    r = CliRunner().invoke(main, ["plan", str(micro), "--gpu-budget", "1K", "--ctx", str(N_CTX)])
    assert r.exit_code == 1 and r.output.startswith("error: GPU budget 1.00 KiB is below the dense part")


def test_device_option_errors(micro):
    """Bad device requests are LocalMoEErrors, raised before any CUDA use."""
    with pytest.raises(LocalMoEError, match="unknown device 'tpu'"):
        localmoe.load(micro, n_ctx=N_CTX, device="tpu")
    with pytest.raises(LocalMoEError, match="GPU budget needs the CUDA device"):
        localmoe.load(micro, n_ctx=N_CTX, device="cpu", gpu_budget="50%")


def test_buffers_follow_the_architecture(tmp_path):
    """Device scratch is sized from the file: the widest FFN counts a shared expert (qwen2moe:
    shexp 64 beside experts of 32), and DeepSeek-V2's MLA gets its own shapes (q per head
    nope + rope, the compressed kv, the absorbed q and the latent output), its KV cache one
    latent row (kv_lora_rank + n_rot) per layer and position, fp16."""
    from gguf import GGMLQuantizationType as T

    from localmoe.planner.gpu import device_buffers, ffn_width
    q2 = micro_model(tmp_path / "q2.gguf", arch="qwen2moe", qtype=T.F16, n_embd=32, n_ff_exp=32, n_ff_shexp=64,
                     n_head_kv=1, head_dim=16)
    with open_gguf(q2) as gf:
        assert ffn_width(gf, 32) == 64
    ds = micro_model(tmp_path / "ds.gguf", arch="deepseek2", variant="v2", qtype=T.F16, n_embd=32, head_dim=16,
                     n_ff=32, n_layer=2, n_expert=8, n_ff_exp=32, n_shared=2, n_lead=1, kv_lora=32, q_lora=32,
                     groups=(4, 2))
    fp = _plan(ds, "0%")[0].fp
    with open_gguf(ds) as gf:
        args = arch_module(gf.arch).ModelArgs.from_gguf(gf)
    b = device_buffers(args, N_CTX, 64)
    nh, r, n_rot = 2, 32, 16  # micro_model's MLA dims: nope 16, rope 16, v 16
    assert b["q"][0] == (N_CTX, nh * 32) and b["k"][0] == (N_CTX, r + n_rot) and b["qa"][0] == (N_CTX, 32)
    assert b["qlat"][0] == (N_CTX, nh * (r + n_rot)) and b["alat"][0] == (N_CTX, nh * r)
    assert b["att"][0] == (N_CTX, nh * 16) and b["gscore"][0] == (N_CTX, 4) and "v" not in b
    assert fp.kv_bytes == 2 * N_CTX * (r + n_rot) * 2

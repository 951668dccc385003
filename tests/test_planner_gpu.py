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

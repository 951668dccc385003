"""benchmarks/memory.py: llama.cpp's logged buffer sizes are read, and the planner's counts sit
beside them. The KV cache is the check that both describe the same context: for a plain-attention
model both sides store fp16 K and V for every layer and position, so the sizes must agree."""
import pytest

from benchmarks import memory
from reference import model_file


@pytest.mark.reference
@pytest.mark.parametrize("n_ctx", [256, 1024])
def test_buffers_read_and_kv_agrees(n_ctx):
    path = model_file("qwen3moe")
    ref, ours = memory.llama_buffers(path, n_ctx), memory.localmoe_counts(path, n_ctx)
    assert ref["compute"] > 0 and ref["output"] > 0
    assert ours["kv"] == pytest.approx(ref["KV"], abs=0.01)  # MiB, as llama.cpp prints them (2 decimals)
    assert ours["minimum"] == pytest.approx(ours["non_expert"] + ours["kv"] + ours["run"] + ours["active"])


@pytest.mark.reference
def test_table(capsys):
    assert memory.main(["--models", str(model_file("qwen3moe")), "--ctx", "128"]) == 0
    out = capsys.readouterr().out
    assert "llama.cpp compute" in out and "min <= anchor" in out

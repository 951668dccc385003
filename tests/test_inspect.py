"""`localmoe inspect` and localmoe.summary on tiny MoE-shaped GGUF files.

Expected byte counts are computed here from the shapes and ggml's block sizes,
not read back from the code under test.
"""
import json
import math
import shutil
import subprocess

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from localmoe.cli import main
from localmoe.summary import summarize

N_EMBD, N_FF, N_VOCAB, N_EXPERT, N_USED = 256, 512, 320, 8, 2
KV_LORA = 128
LOCALMOE = shutil.which("localmoe")  # the installed console script


def nbytes(qtype, shape):
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def layout(arch):
    """{name: (qtype, numpy shape)} and metadata of a tiny model.

    qwen3moe: every layer MoE, separate output head.
    deepseek2: layer 0 dense, shared experts, output tied to token_embd.
    glm4moe: like qwen3moe, but the last layer is an MTP (nextn) layer, not run at decode.
    """
    deepseek = arch == "deepseek2"
    n_layer = 3
    t = {"token_embd.weight": (T.F16, (N_VOCAB, N_EMBD)), "output_norm.weight": (T.F32, (N_EMBD,))}
    if not deepseek:
        t["output.weight"] = (T.Q8_0, (N_VOCAB, N_EMBD))
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (T.F32, (N_EMBD,))
        t[p + "ffn_norm.weight"] = (T.F32, (N_EMBD,))
        if deepseek:  # legacy MHA form (one attn_kv_b): 2 heads of q/k 64 + 64 (rope), v 128
            t[p + "attn_q.weight"] = (T.Q8_0, (N_EMBD, N_EMBD))
            t[p + "attn_kv_a_mqa.weight"] = (T.Q8_0, (KV_LORA + 64, N_EMBD))
            t[p + "attn_kv_a_norm.weight"] = (T.F32, (KV_LORA,))
            t[p + "attn_kv_b.weight"] = (T.Q8_0, (2 * (64 + 128), KV_LORA))
            t[p + "attn_output.weight"] = (T.Q8_0, (N_EMBD, N_EMBD))
        else:  # 2 heads of 128, QK-norm
            for w in ("q", "k", "v", "output"):
                t[p + f"attn_{w}.weight"] = (T.Q8_0, (N_EMBD, N_EMBD))
            t[p + "attn_q_norm.weight"] = (T.F32, (N_EMBD // 2,))
            t[p + "attn_k_norm.weight"] = (T.F32, (N_EMBD // 2,))
        if deepseek and i == 0:
            t[p + "ffn_gate.weight"] = (T.Q4_K, (N_FF, N_EMBD))
            t[p + "ffn_up.weight"] = (T.Q4_K, (N_FF, N_EMBD))
            t[p + "ffn_down.weight"] = (T.Q6_K, (N_EMBD, N_FF))
            continue
        t[p + "ffn_gate_inp.weight"] = (T.F32, (N_EXPERT, N_EMBD))
        t[p + "ffn_gate_exps.weight"] = (T.Q4_K, (N_EXPERT, N_FF, N_EMBD))
        t[p + "ffn_up_exps.weight"] = (T.Q4_K, (N_EXPERT, N_FF, N_EMBD))
        t[p + "ffn_down_exps.weight"] = (T.Q6_K, (N_EXPERT, N_EMBD, N_FF))
        if deepseek:
            t[p + "ffn_gate_shexp.weight"] = (T.Q8_0, (N_FF, N_EMBD))
            t[p + "ffn_up_shexp.weight"] = (T.Q8_0, (N_FF, N_EMBD))
            t[p + "ffn_down_shexp.weight"] = (T.Q8_0, (N_EMBD, N_FF))
    # a complete model's keys: inspect checks a supported architecture's hyperparameters against its tensors
    meta = {"block_count": n_layer, "expert_count": N_EXPERT, "expert_used_count": N_USED,
            "embedding_length": N_EMBD, "context_length": 4096, "attention.head_count": 2,
            "attention.layer_norm_rms_epsilon": 1e-6, "expert_feed_forward_length": N_FF}
    if deepseek:
        meta.update(leading_dense_block_count=1, expert_shared_count=1, feed_forward_length=N_FF,
                    **{"attention.kv_lora_rank": KV_LORA, "rope.dimension_count": 64})
    if arch == "glm4moe":
        meta.update(nextn_predict_layers=1)
    return t, meta


def write_model(path, arch):
    tensors, meta = layout(arch)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(N_VOCAB)])
    for k, v in meta.items():
        w.add_key_value(f"{arch}.{k}", v, gguf.GGUFValueType.FLOAT32 if isinstance(v, float) else gguf.GGUFValueType.UINT32)
    w.add_array(f"{arch}.long_array", list(range(1000)))
    rng = np.random.default_rng(0)
    for name, (qtype, shape) in tensors.items():
        if qtype == T.F32:
            w.add_tensor(name, rng.standard_normal(shape, dtype=np.float32))
        elif qtype == T.F16:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float16))
        else:  # random bytes are fine: nothing is dequantized
            row = nbytes(qtype, shape[-1:])
            w.add_tensor(name, rng.integers(0, 256, (*shape[:-1], row), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(params=["qwen3moe", "deepseek2", "glm4moe"])
def model(request, tmp_path):
    path = tmp_path / f"{request.param}.gguf"
    return request.param, path, write_model(path, request.param)


def expected(arch, tensors):
    """Independent byte accounting from the layout table."""
    b = {n: nbytes(q, s) for n, (q, s) in tensors.items()}
    routed = sum(v for n, v in b.items() if "_exps." in n)
    shared = sum(v for n, v in b.items() if "_shexp." in n)
    embd = b["token_embd.weight"]
    other = sum(b.values()) - routed - shared - embd
    # the MTP layer's weights are in the file but not read at decode
    run = {n: v for n, v in b.items() if not (arch == "glm4moe" and n.startswith("blk.2."))}
    run_routed = sum(v for n, v in run.items() if "_exps." in n)
    run_shared = sum(v for n, v in run.items() if "_shexp." in n)
    run_other = sum(run.values()) - run_routed - run_shared - embd
    tied = "output.weight" not in tensors
    embd_read = embd if tied else embd // N_VOCAB
    return {"routed": routed, "shared": shared, "rest": other + embd,
            "per_token": run_other + embd_read + run_shared + run_routed * N_USED // N_EXPERT}


def test_summary_bytes(model):
    arch, path, tensors = model
    s = summarize(path)
    want = expected(arch, tensors)
    # exact integer byte counts (tolerance 0)
    assert s["experts"]["routed_expert_bytes"] == want["routed"]
    assert s["experts"]["shared_expert_bytes"] == want["shared"]
    assert s["experts"]["other_bytes"] == want["rest"]
    assert s["decode"]["bytes_per_token"] == want["per_token"]
    assert s["total_bytes"] == sum(nbytes(q, sh) for q, sh in tensors.values())
    for t in s["tensors"]:
        q, shape = tensors[t["name"]]
        assert (t["type"], tuple(t["shape"]), t["bytes"]) == (q.name, shape, nbytes(q, shape))
    assert len(s["tensors"]) == len(tensors)
    by_type = {}
    for q, shape in tensors.values():
        by_type[q.name] = by_type.get(q.name, 0) + nbytes(q, shape)
    assert {k: v["bytes"] for k, v in s["totals_by_type"].items()} == by_type


def test_summary_layout(model):
    arch, path, _ = model
    s = summarize(path)
    ex = s["experts"]
    assert (ex["expert_count"], ex["expert_used_count"]) == (N_EXPERT, N_USED)
    assert s["architecture"] == arch and s["name"] == f"tiny {arch}"
    assert s["file_type"] == "MOSTLY_Q4_K_M" and s["tokenizer_model"] == "gpt2"
    assert s["vocab_size"] == N_VOCAB
    assert s["hyperparameters"]["long_array"] == "[1000 values]"
    assert s["hyperparameters"]["block_count"] == 3
    if arch == "deepseek2":
        assert (ex["moe_layers"], ex["dense_layers"]) == ([1, 2], [0])
        assert ex["has_shared_experts"] and ex["expert_shared_count"] == 1
        assert s["decode"]["tied_output"]
    else:
        assert (ex["moe_layers"], ex["dense_layers"]) == ([0, 1, 2], [])
        assert not ex["has_shared_experts"] and not s["decode"]["tied_output"]
    assert ex["nextn_predict_layers"] == (1 if arch == "glm4moe" else 0)


def test_cli_json_and_text(model):
    arch, path, tensors = model
    r = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["decode"]["bytes_per_token"] == expected(arch, tensors)["per_token"]
    assert len(s["tensors"]) == len(tensors)

    r = CliRunner().invoke(main, ["inspect", str(path), "--json", "--no-tensors"])
    assert r.exit_code == 0 and "tensors" not in json.loads(r.output)

    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    assert "blk.1.ffn_down_exps.weight" in r.output and "Q6_K" in r.output
    assert f"routed experts ({N_USED}/{N_EXPERT})" in r.output
    r = CliRunner().invoke(main, ["inspect", str(path), "--no-tensors"])
    assert r.exit_code == 0 and "blk.1.ffn_down_exps.weight" not in r.output


def test_subprocess(tmp_path):
    assert LOCALMOE, "the localmoe console script is not on PATH (pip install -e .)"
    path = tmp_path / "m.gguf"
    tensors = write_model(path, "qwen3moe")
    cmd = [LOCALMOE, "inspect", "--json", str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["decode"]["bytes_per_token"] == expected("qwen3moe", tensors)["per_token"]


@pytest.mark.parametrize("content", [None, b"", b"GGUF\x03\x00\x00\x00garbage", b"not a gguf file at all" * 10])
def test_bad_file(tmp_path, content):
    path = tmp_path / "bad.gguf"
    if content is not None:
        path.write_bytes(content)
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 1, r.output
    assert r.output.startswith("error: ") and "Traceback" not in r.output


def test_truncated_file_subprocess(tmp_path):
    good = tmp_path / "m.gguf"
    write_model(good, "qwen3moe")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[:5000])
    cmd = [LOCALMOE, "inspect", str(bad)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr

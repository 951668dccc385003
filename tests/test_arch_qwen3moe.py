"""qwen3moe vs llama.cpp on a tiny random model, F16 and llama.cpp-quantized files."""
import pytest

from reference import check_greedy, check_logits

pytestmark = pytest.mark.reference


def test_logits_match_llama_cpp(ftype):
    check_logits("qwen3moe", ftype)


def test_greedy_matches_llama_cpp(ftype):
    check_greedy("qwen3moe", ftype)


# --- the runtime API, on the same tiny model ---------------------------------

import numpy as np  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import localmoe  # noqa: E402
import localmoe.model  # noqa: E402
from localmoe.cli import main  # noqa: E402
from reference import logits_batch, model_file, nmse, tokenize  # noqa: E402


def test_expert_override_matches_llama_cpp_override_kv():
    """load(n_expert_used=K) == llama.cpp with --override-kv qwen3moe.expert_used_count=int:K."""
    path = model_file("qwen3moe")
    tokens = tokenize(path, "Experts: fewer of them, please.")
    k = 2
    ref = logits_batch(path, tokens, kv_overrides={"qwen3moe.expert_used_count": k})
    default = logits_batch(path, tokens)
    ours = localmoe.load(path, n_ctx=128, n_expert_used=k).eval(tokens)
    e, moved = nmse(ours, ref), nmse(default, ref)
    print(f"qwen3moe n_expert_used={k}: NMSE {e:.3g}; the override itself moves logits by {moved:.3g}")
    assert moved > 1e-3, "the override should matter on this model"
    assert e <= 1e-4, f"NMSE {e:.3g} > 1e-4"


@pytest.fixture(scope="module")
def model():
    return localmoe.load(model_file("qwen3moe"), n_ctx=32)


def test_chunked_prefill_equals_one_batch(model):
    toks = list(range(100, 112))
    whole = model.eval(toks)
    model.reset()
    parts = np.concatenate([model.forward(toks[:5]), model.forward(toks[5:9]), model.forward(toks[9:])])
    e = nmse(parts, whole)
    assert e <= 1e-8, f"NMSE {e:.3g} > 1e-8"
    np.testing.assert_array_equal(model.eval(toks), whole)  # eval starts from an empty cache


def test_micro_batches_equal_one_batch(model, monkeypatch):
    toks = list(range(100, 111))
    whole = model.eval(toks)
    monkeypatch.setattr(localmoe.model, "N_UBATCH", 4)
    split = model.eval(toks)
    e = nmse(split, whole)
    assert split.shape == whole.shape and e <= 1e-8, f"NMSE {e:.3g} > 1e-8"
    model.reset()
    last = model.forward(toks, all_logits=False)
    assert last.shape == (1, whole.shape[1])
    np.testing.assert_array_equal(last[0], split[-1])


def test_context_overflow_is_a_clear_error(model):
    model.eval(list(range(30)))
    with pytest.raises(localmoe.LocalMoEError, match="context overflow"):
        model.forward([1, 2, 3])


def test_bad_load_options_are_clear_errors():
    with pytest.raises(localmoe.LocalMoEError, match="n_expert_used"):
        localmoe.load(model_file("qwen3moe"), n_expert_used=999)
    with pytest.raises(localmoe.LocalMoEError, match="unknown load options"):
        localmoe.load(model_file("qwen3moe"), n_gpu_layers=3)


def test_greedy_generate_tokens_is_argmax(model):
    prompt = model.tokenize("Once upon a time")
    got = list(model.generate_tokens(prompt, max_tokens=6, temperature=0))
    model.reset()
    row, want = model.forward(prompt)[-1], []
    for _ in range(6):
        want.append(int(np.argmax(row)))
        row = model.forward([want[-1]])[0]
    assert got == want


def test_generate_streams_text_and_stops(model):
    pieces = list(model.generate("Once upon a time", max_tokens=8, temperature=0))
    text = "".join(pieces)
    assert text == model.detokenize(list(model.generate_tokens(model.tokenize("Once upon a time"), 8,
                                                               temperature=0)))
    stop = text[2:4]
    cut = "".join(model.generate("Once upon a time", max_tokens=8, temperature=0, stop=[stop]))
    assert cut == text[: text.index(stop)]


def test_cli_run_streams_and_reports_speed():
    res = CliRunner().invoke(main, ["run", str(model_file("qwen3moe")), "-p", "Hello", "-n", "4",
                                    "--temp", "0", "--experts-per-token", "2", "--ctx", "64"])
    assert res.exit_code == 0, res.output
    assert "tokens/s" in res.stderr and "decode: 3 tokens" in res.stderr
    bad = CliRunner().invoke(main, ["run", str(model_file("qwen3moe")), "-p", "Hi", "--experts-per-token", "99"])
    assert bad.exit_code == 1 and "error:" in bad.output

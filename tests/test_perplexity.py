"""localmoe.perplexity and `localmoe perplexity`: llama.cpp's chunking and scoring, and its numbers."""
import math
from types import SimpleNamespace

import llama_cpp  # noqa: F401  (the reference tests below need it; never skip)
import numpy as np
import pytest
from click.testing import CliRunner

import localmoe
from benchmarks._reference_ppl import llama_perplexity
from localmoe.cli import main
from localmoe.perplexity import PerplexityError, perplexity
from localmoe.shipped import default_model_path
from models.train.corpus import fetch_sdist, load_splits
from reference import model_file

LN2 = math.log(2)
PROBS = [0.5, 0.25, 0.125, 0.125]  # every scored row's distribution: -log p = ln2 * (1, 2, 3, 3)


class FakeModel:
    """A 4-token model with known logits; it records the chunks it is asked to evaluate."""

    def __init__(self, add_bos: bool, n_ctx_train: int = 64):
        self.args = SimpleNamespace(n_ctx_train=n_ctx_train)
        self.n_ctx = n_ctx_train
        self.tokenizer = SimpleNamespace(add_bos=add_bos, add_eos=False, bos_id=3)
        self.seen = []

    def eval(self, tokens):
        self.seen.append(list(tokens))
        n = len(tokens)
        logits = np.tile(np.log(np.array(PROBS, dtype=np.float32)) + np.float32(7), (n, 1))
        # rows the tool never scores (first half, last position) would change every number
        logits[: n // 2, 0] = np.float32(50)
        logits[n - 1, 1] = np.float32(50)
        return logits


# n_ctx 6: first = 3, rows 3 and 4 score tokens 4 and 5 of each chunk; 2 chunks, 1 token left over
TOKENS = [2, 2, 2, 2, 0, 1,   1, 1, 1, 1, 2, 3,   0]


@pytest.mark.parametrize("add_bos", [False, True])
def test_scoring_by_hand(add_bos):
    fake = FakeModel(add_bos)
    running = []
    r = perplexity(fake, TOKENS, n_ctx=6, progress=lambda i, n, p: running.append((i, n, p)))
    # chunk 1 scores tokens 0, 1: ln2*(1+2); chunk 2 scores 2, 3: ln2*(3+3)
    assert (r.n_chunks, r.n_scored) == (2, 4)
    assert r.nll_mean == pytest.approx(9 / 4 * LN2, rel=1e-6), "mean NLL, rel 1e-6"
    assert r.ppl == pytest.approx(2 ** (9 / 4), rel=1e-6), "PPL, rel 1e-6"
    assert r.running == pytest.approx((2 ** 1.5, 2 ** 2.25), rel=1e-6), "running PPL, rel 1e-6"
    assert [(i, n) for i, n, _ in running] == [(1, 2), (2, 2)]
    # llama.cpp's +/-: ppl * sqrt((E[x^2] - E[x]^2) / (count - 1)) over x = ln2 * (1, 2, 3, 3)
    err = 2 ** 2.25 * LN2 * math.sqrt((23 / 4 - (9 / 4) ** 2) / 3)
    assert r.ppl_err == pytest.approx(err, rel=1e-6), "PPL uncertainty, rel 1e-6"
    first = [3] if add_bos else [2]
    assert fake.seen == [first + [2, 2, 2, 0, 1], ([3] if add_bos else [1]) + [1, 1, 1, 2, 3]]


def test_chunk_cap_and_errors():
    assert perplexity(FakeModel(False), TOKENS, n_ctx=6, n_chunks=1).running == pytest.approx((2 ** 1.5,),
                                                                                              rel=1e-6)
    with pytest.raises(PerplexityError, match="you need at least 14 tokens .* context of 7.* only 13 tokens"):
        perplexity(FakeModel(False), TOKENS, n_ctx=7)
    with pytest.raises(PerplexityError, match="training context \\(8\\)"):
        perplexity(FakeModel(False, n_ctx_train=8), TOKENS * 3, n_ctx=16)


# --- against llama.cpp --------------------------------------------------------

@pytest.fixture(scope="module")
def heldout_text():
    return "\n\n".join(text for _, text in load_splits(fetch_sdist())["heldout"])


def _compare(path, text, n_ctx, n_chunks=3):
    m = localmoe.load(path, n_threads=2, n_ctx=n_ctx)
    tokens = m.tokenize(text)
    ours = perplexity(m, tokens, n_ctx=n_ctx, n_chunks=n_chunks)
    ref = llama_perplexity(path, tokens, n_ctx, n_chunks, n_threads=2)
    rel = abs(ours.ppl / ref.ppl - 1)
    print(f"{path.name} ctx {n_ctx}: localmoe {ours.ppl:.4f}, llama.cpp {ref.ppl:.4f} (rel diff {rel:.2e})")
    assert (ours.n_chunks, ours.n_scored) == (ref.n_chunks, ref.n_scored) == (n_chunks, n_chunks * (n_ctx // 2 - 1))
    assert rel <= 5e-3, f"PPL {ours.ppl:.4f} vs llama.cpp {ref.ppl:.4f}: relative difference {rel:.2e} > 0.5%"
    assert ours.ppl_err == pytest.approx(ref.ppl_err, rel=1e-2), "PPL uncertainty, rel 1%"


@pytest.mark.reference
def test_shipped_model_matches_llama_cpp(heldout_text):
    path = default_model_path()
    n_ctx = min(256, localmoe.load(path).args.n_ctx_train)
    _compare(path, heldout_text, n_ctx)


@pytest.mark.reference
@pytest.mark.parametrize("arch,ftype", [("qwen3moe", "F16"), ("qwen3moe", "Q8_0"), ("llama", "F16")])
def test_random_model_matches_llama_cpp(heldout_text, arch, ftype):
    """llama's vocab adds BOS: that chunk rule is covered too."""
    _compare(model_file(arch, ftype), heldout_text, 64)


# --- the command --------------------------------------------------------------

def test_cli(tmp_path):
    path = model_file("qwen3moe")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40 + "\n")
    res = CliRunner().invoke(main, ["perplexity", str(path), str(text), "--ctx", "32", "--chunks", "3",
                                    "--threads", "1"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert [p.split("]")[0] for p in lines[0].rstrip(",").split(",")] == ["[1", "[2", "[3"], lines[0]
    m = localmoe.load(path, n_ctx=32)
    want = perplexity(m, (text.read_text()[:-1]), n_ctx=32, n_chunks=3)
    assert lines[-1] == f"Final estimate: PPL = {want.ppl:.4f} +/- {want.ppl_err:.5f}"

    text.write_text("Too short.")
    res = CliRunner().invoke(main, ["perplexity", str(path), str(text), "--ctx", "32"])
    assert res.exit_code == 1
    assert "error: you need at least 64 tokens to evaluate perplexity with a context of 32" in res.stderr

    res = CliRunner().invoke(main, ["perplexity", str(path), str(tmp_path / "missing.txt")])
    assert res.exit_code == 1 and "error: cannot read" in res.stderr, res.output
    res = CliRunner().invoke(main, ["perplexity", str(path), str(text), "--ctx", "65536"])
    assert res.exit_code == 1 and "longer than the model's training context (40960)" in res.stderr, res.output
    text.write_bytes(b"caf\xe9")
    res = CliRunner().invoke(main, ["perplexity", str(path), str(text)])
    assert res.exit_code == 1 and "is not UTF-8 text" in res.stderr, res.output

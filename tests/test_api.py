"""The top-level API (localmoe.load / generate / chat / perplexity) on a tiny random model."""
import subprocess
import sys

import numpy as np
import pytest

import localmoe
from localmoe.chat_template import ChatTemplate
from localmoe.errors import LocalMoEError
from reference import model_file

N = 8


@pytest.fixture(scope="module")
def path():
    return model_file("qwen3moe")


@pytest.fixture(scope="module")
def model(path):
    return localmoe.load(path, n_ctx=128)


def _argmax_text(m, ids, n=N):
    """Greedy continuation by hand: argmax of the logits, stopping at end-of-generation."""
    m.reset()
    row, out = m.forward(ids, all_logits=False)[-1], []
    for _ in range(n):
        t = int(np.argmax(row))
        if m.tokenizer.is_eog(t):
            break
        out.append(t)
        row = m.forward([t])[-1]
    return m.detokenize(out)


def test_import_stays_light():
    code = "import sys, localmoe; localmoe.chat; localmoe.generate; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_generate(path, model):
    want = _argmax_text(model, model.tokenize("The quick brown fox"))
    assert localmoe.generate(model, "The quick brown fox", max_tokens=N, temperature=0) == want
    assert localmoe.generate(str(path), "The quick brown fox", max_tokens=N, temperature=0) == want
    pieces = localmoe.generate(model, "The quick brown fox", stream=True, max_tokens=N, temperature=0)
    assert not isinstance(pieces, str) and "".join(pieces) == want


def test_chat(model):
    from localmoe.chat import prompt_tokens
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Name a colour."}]
    template = ChatTemplate.from_metadata(model.file.metadata, model.tokenizer)
    want = _argmax_text(model, prompt_tokens(model.tokenizer, template, msgs))
    assert want, "the random model should say something in 8 tokens"
    assert localmoe.chat(model, msgs, max_tokens=N, temperature=0) == want
    stop = want[len(want) // 2:][:2]
    assert localmoe.chat(model, msgs, max_tokens=N, temperature=0, stop=stop) == want[:want.index(stop)]
    with pytest.raises(LocalMoEError, match="ending with a user message"):
        localmoe.chat(model, msgs[:-1])
    with pytest.raises(LocalMoEError, match="message 0 needs a role"):
        localmoe.chat(model, [{"role": "bot", "content": "x"}])


def test_perplexity(path, model):
    text = "To be, or not to be, that is the question. " * 20
    r = localmoe.perplexity(str(path), text, n_ctx=32, n_chunks=2)
    assert (r.n_chunks, r.n_scored) == (2, 30)
    assert r.ppl == pytest.approx(localmoe.perplexity(model, text, n_ctx=32, n_chunks=2).ppl, rel=1e-9), \
        "path and loaded model give the same PPL, rel 1e-9"


def test_names_survive_submodule_imports():
    import localmoe.chat  # noqa: F401  (rebinds nothing: the API names stay functions)
    import localmoe.perplexity  # noqa: F401
    from localmoe.chat import ChatSession  # noqa: F401
    assert callable(localmoe.chat) and localmoe.chat.__module__ == "localmoe"
    assert localmoe.perplexity.__module__ == "localmoe"

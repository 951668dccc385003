"""The shipped models (the default, qwen3moe, and the fine-grained deepseek2 one): the files the
golden ids were made from, and localmoe's greedy tokens and logits on them equal to llama.cpp's.
After replacing a model: python -m tests.make_golden."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

import localmoe
from benchmarks.quality import expert_key
from localmoe.cli import main
from localmoe.shipped import FILENAME, SHIPPED, default_model_path, shipped_path
from reference import greedy, logits_batch, logits_stepwise, tokenize
from tests.make_golden import N_TOKENS, golden_path, sha256


ROMEO = "ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n" * 2


@pytest.fixture(scope="module", params=SHIPPED)
def name(request):
    return request.param


def load_golden(name: str) -> dict:
    path = golden_path(name)
    if not path.exists():
        pytest.fail(f"{path} is missing: run python -m tests.make_golden for the shipped models")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def golden(name):
    return load_golden(name)


@pytest.fixture(autouse=True)
def packaged(monkeypatch):
    monkeypatch.delenv("LOCALMOE_MODEL", raising=False)


def test_default_is_the_first_shipped_model():
    assert default_model_path() == shipped_path(SHIPPED[0]) == shipped_path(FILENAME)


def test_golden_is_for_this_file(name, golden):
    path = shipped_path(name)
    assert sha256(path) == golden["sha256"], (
        f"{path.name} is not the file {golden_path(name).name} was made from: run python -m tests.make_golden")
    assert len(golden["greedy_ids"]) == N_TOKENS


@pytest.mark.reference
def test_llama_cpp_greedy_matches_golden(name, golden):
    path = shipped_path(name)
    assert tokenize(path, golden["prompt"]) == golden["prompt_ids"]
    ids, _ = greedy(path, golden["prompt_ids"], N_TOKENS)
    assert ids == golden["greedy_ids"], "llama.cpp's greedy ids (tolerance: exact)"


@pytest.mark.reference
def test_localmoe_greedy_matches_golden(name, golden):
    m = localmoe.load(shipped_path(name), n_threads=2)
    assert m.tokenize(golden["prompt"]) == golden["prompt_ids"]
    m.reset()
    row = m.forward(golden["prompt_ids"], all_logits=False)[-1]
    ids = []
    for _ in range(N_TOKENS):  # argmax like the golden, end-of-generation included
        ids.append(int(np.argmax(row)))
        row = m.forward(ids[-1:])[-1]
    assert ids == golden["greedy_ids"], "localmoe's greedy ids vs llama.cpp's (tolerance: exact)"


@pytest.mark.reference
def test_run_without_model_uses_the_shipped_one():
    golden = load_golden(FILENAME)
    res = CliRunner().invoke(main, ["run", "-p", golden["prompt"], "-n", str(N_TOKENS), "--temp", "0"])
    assert res.exit_code == 0, res.output
    tok = localmoe.load_tokenizer(default_model_path())
    ids = golden["greedy_ids"]
    ends = [i for i, t in enumerate(ids) if tok.is_eog(t)]
    assert res.stdout == tok.decode(ids[:ends[0] if ends else None]) + "\n"


def test_env_override_and_missing_model(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALMOE_MODEL", str(tmp_path / "none.gguf"))
    res = CliRunner().invoke(main, ["run", "-p", "Hi", "-n", "1"])
    assert res.exit_code == 1
    assert f"error: no model at {tmp_path / 'none.gguf'} ($LOCALMOE_MODEL)" in res.stderr


def test_chat_without_model_uses_the_shipped_one():
    msg = "Good morrow, sir."
    want = localmoe.chat(default_model_path(), [{"role": "user", "content": msg}], max_tokens=6, temperature=0)
    res = CliRunner().invoke(main, ["chat", "-n", "6", "--temp", "0"], input=f"{msg}\n/bye\n")
    assert res.exit_code == 0, res.output
    assert want and res.stdout == want + "\n"


def test_prompt_escapes_follow_llama_cpp():
    """llama.cpp's -e (default on): known escapes become characters, unknown ones stay as typed."""
    from localmoe.cli.options import process_escapes
    cases = {r"a\nb\tc": "a\nb\tc", r"\\n": "\\n", "x\\": "x\\", r"\q": r"\q", r"\x41\x4": r"A\x4",
             r"\'\"": "'\"", r"\xc3\xa9": "é"}
    assert {k: process_escapes(k) for k in cases} == cases


def test_chat_reply_ends_at_the_turn_break():
    """The model has no end-of-turn token: its template ends turns with a blank line, so a reply
    stops there (ChatML-style templates end turns with a special token and get no text stop)."""
    from localmoe.chat import ChatSession
    from localmoe.chat_template import ChatTemplate
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert ChatTemplate(chatml).turn_end() == "<|im_end|>\n"
    with localmoe.load(default_model_path()) as m:
        s = ChatSession(m, temperature=0, max_tokens=200)
        reply = s.send("Who art thou?")
        text = "".join(reply)
        assert reply.stop_reason == "end" and "\n\n" not in text and text.strip(), repr(text)
        assert len(text) < 400, "the reply ran past the turn break"


@pytest.mark.reference
@pytest.mark.parametrize("k", [2, 6])   # the trained k of one model, and a k it was not trained for
def test_stepwise_logits_bit_identical_to_llama_cpp(name, k):
    """Token by token (the decode path), every position's logits equal llama.cpp's (tolerance: 0).
    A trained model is far more sensitive than the random test models: a last-bit difference
    anywhere (router order, silu, softmax) flips some Q8_0 activation rounding within a few
    dozen positions, and greedy decodes part at near-ties (benchmarks/parting.py)."""
    path = shipped_path(name)
    ids = tokenize(path, ROMEO)
    ref = logits_stepwise(path, ids, kv_overrides={expert_key(path): k})
    with localmoe.load(path, n_ctx=128) as m:
        m.set_expert_used(k)
        ours = np.stack([m.forward([t])[-1] for t in ids])
    differ = [i for i in range(len(ids)) if not np.array_equal(ours[i], ref[i])]
    assert not differ, f"k={k}: logits differ from llama.cpp's at positions {differ} of {len(ids)}"


@pytest.mark.reference
@pytest.mark.parametrize("text,k", [(ROMEO, 2), (ROMEO, 6), ("MACBETH\n\nby William Shakespeare\n\n\n\n\nPersons Rep", 2)])
def test_batch_logits_bit_identical_to_llama_cpp(name, text, k):
    """A prompt in one batch: every position's logits equal llama.cpp's (tolerance: 0), although
    llama.cpp's own batch logits differ from its token-by-token ones on the qwen3moe model (k = 6 from position 9):
    batches take llamafile sgemm's order for the F32 router (arch/base.router_logits), and the
    F16 attention products (layers._dot_f16)."""
    path = shipped_path(name)
    ids = tokenize(path, text)
    ref = logits_batch(path, ids, kv_overrides={expert_key(path): k})
    with localmoe.load(path, n_ctx=128) as m:
        m.set_expert_used(k)
        ours = m.forward(ids)
    differ = [i for i in range(len(ids)) if not np.array_equal(ours[i], ref[i])]
    assert not differ, f"k={k}: logits differ from llama.cpp's at prompt positions {differ} of {len(ids)}"

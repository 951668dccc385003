"""Invalid UTF-8 wherever text enters (finding 5): it becomes U+FFFD, never a crash."""
import json

import pytest

import localmoe
from localmoe.chat import ChatSession
from localmoe.errors import LocalMoEError
from localmoe.tokenizer.text import MAX_TEXT_CHARS, clean_text

from hostile_common import SHIPPED, assert_ok, cli

BAD = "ab\udcff\udcfecd"          # what Python makes of the bytes FF FE (surrogateescape)
GOOD = "ab\ufffd\ufffdcd"


@pytest.fixture(scope="module")
def model():
    with localmoe.load(SHIPPED, n_ctx=64) as m:
        yield m


def test_the_rule():
    assert clean_text(BAD) == GOOD
    assert clean_text("x\ud800y") == "x\ufffdy"              # a lone surrogate that escapes no byte
    assert clean_text(b"\xe2\x82!".decode("utf-8", "surrogateescape")) == "\ufffd!"  # as bytes.decode(errors="replace")
    assert clean_text("é 🦙") == "é 🦙"


def test_api_tokenize_generate_and_chat(model, tmp_path):
    assert model.tokenize(BAD) == model.tokenize(GOOD)
    assert model.tokenize(BAD.encode("utf-8", "surrogateescape")) == model.tokenize(GOOD)
    out = list(model.generate(BAD, max_tokens=3, temperature=0))
    assert out == list(model.generate(GOOD, max_tokens=3, temperature=0))
    assert isinstance(localmoe.generate(model, BAD, max_tokens=2, temperature=0), str)
    s = ChatSession(model, system="sys \udcff", max_tokens=3, temperature=0)
    "".join(s.send(BAD))
    s.save(tmp_path / "c.json")  # the history holds no lone surrogates: it encodes
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["messages"][1]["content"] == GOOD and saved["messages"][0]["content"] == "sys \ufffd"
    localmoe.chat(model, [{"role": "user", "content": BAD}], max_tokens=2, temperature=0)
    with pytest.raises(LocalMoEError, match="must be a str"):
        model.tokenize(None)


def test_a_saved_chat_with_lone_surrogates_loads(model, tmp_path):
    f = tmp_path / "s.json"
    f.write_text('{"format": "localmoe-chat", "version": 1, "messages": [{"role": "user", "content": "a\\udcff"}]}')
    s = ChatSession(model)
    s.load(f)
    assert s.messages[0]["content"] == "a\ufffd"


def test_too_long_text_is_refused_before_the_tokenizer(model):
    with pytest.raises(LocalMoEError, match="too long to tokenize"):
        model.tokenize("x" * (MAX_TEXT_CHARS + 1))


@pytest.mark.parametrize("flag", ["-E", "-e"])
def test_run_with_invalid_utf8_prompt(flag):
    assert_ok(cli("run", flag, "-n", "2", "--temp", "0", "-p", b"\xff\xfe hello"))


def test_run_with_invalid_utf8_escape_and_stop():
    assert_ok(cli("run", "-n", "2", "--temp", "0", "-p", "a\\xff", "--stop", b"\xfe"))


def test_chat_with_invalid_utf8_on_stdin():
    p = cli("chat", "-n", "3", "--temp", "0", stdin=b"\xff\xfe hello\n/set system \xff\nROMEO\xc3.\n/bye\n")
    assert_ok(p)
    assert p.stdout.strip()


def test_chat_system_argument_with_invalid_utf8():
    assert_ok(cli("chat", "-n", "2", "--temp", "0", "--system", b"\xff", stdin=b"hi\n"))

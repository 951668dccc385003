"""Tokenizer from GGUF metadata: llama.cpp's test vectors, round trips, streaming, and
(marked `reference`) token-for-token agreement with llama.cpp through llama-cpp-python."""
import ctypes
import functools
import random

import pytest
from hypothesis import given, settings, strategies as st

from localmoe.errors import GGUFFormatError, LocalMoEError, UnsupportedError
from localmoe.gguf_file import open_gguf
from localmoe.tokenizer import Detokenizer, Tokenizer, load_tokenizer
from models import vocab as vocab_files
from models.vocab import NAMES, vocab_path

BPE = ["llama-bpe", "deepseek-llm", "qwen2", "gpt-2"]


@functools.lru_cache(maxsize=None)
def tok(name: str) -> Tokenizer:
    return load_tokenizer(vocab_path(name))


@functools.lru_cache(maxsize=None)
def metadata(name: str) -> dict:
    with open_gguf(vocab_path(name)) as g:
        return {k: g.metadata[k] for k in g.metadata}


# --- llama.cpp's own vectors (tests/test-tokenizer-0.cpp: add_special=false, parse_special=false)

@pytest.mark.parametrize("name", NAMES)
def test_llama_cpp_vectors(name):
    t = tok(name)
    for text, ids in vocab_files.test_vectors(name):
        assert t.encode(text, add_special=False, special=False) == ids, repr(text)


# --- round trips as llama.cpp's tests/test-tokenizer-1-{spm,bpe}.cpp check them (sampled)

@pytest.mark.parametrize("name", NAMES)
def test_token_text_round_trip(name):
    t = tok(name)
    for i in random.Random(0).sample(range(t.n_vocab), 1500):
        s = t.decode([i], special=True)  # common_detokenize's default
        if "\ufffd" in s and "\ufffd".encode() not in t.token_to_piece(i):
            continue  # part of a character: llama.cpp skips these too (invalid UTF-8)
        ids = t.encode(s, add_special=False, special=True)
        assert t.decode(ids, special=True) == s, (i, s, ids)
        if name in BPE and t._pre.ignore_merges:  # a token's own text is that one token
            assert t.encode(t.token_to_piece(i).decode(), add_special=False, special=True) == [i], i


@pytest.mark.parametrize("name", NAMES)
def test_codepoint_round_trip(name):
    t = tok(name)
    for cp in range(1, 0x40000, 37):
        if 0xD800 <= cp <= 0xDFFF or cp == 0x2581:  # surrogates; llama.cpp also skips U+2581
            continue
        s = chr(cp)
        assert t.decode(t.encode(s, add_special=False), special=True) == s, hex(cp)


@pytest.mark.parametrize("name", ["deepseek-llm", "qwen2"])  # vocabs without clean_spaces
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
@settings(max_examples=60, deadline=None)
def test_text_round_trip(name, text):
    assert tok(name).decode(tok(name).encode(text, add_special=False)) == text


# --- special tokens, BOS/EOS, end of generation

def test_special_tokens_parsed_only_when_asked():
    t = tok("qwen2")
    im_start, im_end = t.vocab["<|im_start|>"], t.vocab["<|im_end|>"]
    text = "<|im_start|>user\nhi<|im_end|>"
    parsed = t.encode(text, add_special=False, special=True)
    assert parsed[0] == im_start and parsed[-1] == im_end
    assert parsed[1:-1] == t.encode("user\nhi", add_special=False)
    plain = t.encode(text, add_special=False, special=False)
    assert im_start not in plain and im_end not in plain
    assert t.decode(plain) == text
    assert t.decode(parsed) == "user\nhi"  # control tokens are hidden unless special=True
    assert t.decode(parsed, special=True) == text


def test_spm_space_prefix_after_special_token():
    t = tok("llama-spm")
    ids = t.encode("<s>Hello", add_special=False, special=True)
    assert ids[0] == t.bos_id
    assert ids[1:] == t.encode("Hello", add_special=False)  # "▁Hello": prefix again after <s>
    assert t.token_to_piece(ids[1]) == b" Hello"


@pytest.mark.parametrize("name", NAMES)
def test_add_special_follows_metadata_and_llama_cpp_defaults(name):
    t, md = tok(name), metadata(name)
    # llama.cpp: SPM and llama3-style BPE ("llama-bpe") add BOS by default, other BPE not
    want_bos = md.get("tokenizer.ggml.add_bos_token", name in ("llama-spm", "llama-bpe"))
    want_eos = md.get("tokenizer.ggml.add_eos_token", False)
    body = t.encode("Hi", add_special=False)
    ids = t.encode("Hi", add_special=True)
    assert ids == [md["tokenizer.ggml.bos_token_id"]] * want_bos + body \
        + [md["tokenizer.ggml.eos_token_id"]] * want_eos


def test_eog_ids():
    q = tok("qwen2")
    assert {q.vocab["<|im_end|>"], q.vocab["<|endoftext|>"]} <= q.eog_ids
    assert q.is_eog(q.vocab["<|im_end|>"]) and not q.is_eog(q.vocab["<|im_start|>"])
    ll = tok("llama-bpe")
    assert {ll.eos_id, ll.vocab["<|eot_id|>"]} <= ll.eog_ids
    assert tok("llama-spm").eog_ids == {tok("llama-spm").eos_id}


# --- decoding

def test_spm_byte_fallback_decodes_and_streams():
    t = tok("llama-spm")
    assert "\U0001f999" not in t.vocab
    ids = [t.vocab[f"<0x{b:02X}>"] for b in "\U0001f999".encode()]
    assert t.encode("\U0001f999", add_special=False) == [t.vocab["\u2581"]] + ids
    d = Detokenizer(t, at_start=False)
    assert [d.feed(i) for i in ids] == ["", "", "", "\U0001f999"]  # text only once the character is complete
    assert d.flush() == ""


def test_spm_leading_space_is_dropped_once():
    t = tok("llama-spm")
    ids = t.encode("Hello world", add_special=False)
    assert t.decode(ids) == "Hello world"
    assert t.decode(ids + ids) == "Hello world Hello world"
    d = Detokenizer(t, at_start=False)  # continuing a text keeps the space
    assert "".join(d.feed(i) for i in ids) + d.flush() == " Hello world"


def test_clean_spaces_across_token_boundaries():
    t = tok("gpt-2")
    ids = [i for c in "Hello , world . It ' s 're" for i in t.encode(c, add_special=False)]  # spaces alone
    assert len(ids) == len("Hello , world . It ' s 're")
    pieces = _stream(t, ids)
    assert "".join(pieces) == t.decode(ids) == "Hello, world. It's're"


def test_clean_spaces_only_where_the_vocab_asks():
    text = "Hello , world . It ' s"
    gpt2, qwen = tok("gpt-2"), tok("qwen2")  # llama.cpp: gpt-2 cleans, qwen2 does not
    assert gpt2.decode(gpt2.encode(text)) == "Hello, world. It's"
    assert qwen.decode(qwen.encode(text)) == text


def _stream(t, ids, **kw):
    d = Detokenizer(t, **kw)
    pieces = [d.feed(i) for i in ids] + [d.flush()]
    return pieces


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_stream_equals_decode(name, data):
    t = tok(name)
    special_ids = sorted(set(t._special) | {t.bos_id or 0, t.eos_id or 0})
    # single characters that clean_spaces rewrites around
    clean_ids = sorted({i for c in " ,.'!?smrev" for i in t.encode(c, add_special=False)})
    ids = data.draw(st.lists(st.one_of(st.integers(0, t.n_vocab - 1), st.sampled_from(special_ids),
                                       st.integers(0, 300), st.sampled_from(clean_ids)), max_size=30))
    special, remove = data.draw(st.booleans()), data.draw(st.booleans())
    pieces = _stream(t, ids, special=special, remove_special=remove)
    assert "".join(pieces) == t.decode(ids, special=special, remove_special=remove)


@pytest.mark.parametrize("name", NAMES)
def test_stream_splits_multibyte_characters_cleanly(name):
    t = tok(name)
    text = "🦙 ok 中文 😀!"
    pieces = _stream(t, t.encode(text, add_special=False))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


# --- errors

def test_unsupported_and_malformed_vocab_errors():
    md = dict(metadata("qwen2"))
    with pytest.raises(UnsupportedError, match="pre-tokenizer 'nope'"):
        Tokenizer.from_gguf({**md, "tokenizer.ggml.pre": "nope"})
    with pytest.raises(UnsupportedError, match="'bert'"):
        Tokenizer.from_gguf({**md, "tokenizer.ggml.model": "bert"})
    with pytest.raises(GGUFFormatError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf({})
    with pytest.raises(GGUFFormatError, match="merges"):
        Tokenizer.from_gguf({k: v for k, v in md.items() if k != "tokenizer.ggml.merges"})
    assert issubclass(UnsupportedError, LocalMoEError)


def test_merges_outside_the_vocab_are_dropped_not_fatal():
    md = dict(metadata("gpt-2"))
    md["tokenizer.ggml.merges"] = md["tokenizer.ggml.merges"] + ["x \u0100\u0100nope"]
    t = Tokenizer.from_gguf(md)
    assert t.n_dropped_merges == 1
    assert t.encode("Hello world", add_special=False) == tok("gpt-2").encode("Hello world", add_special=False)


# --- llama.cpp itself (llama-cpp-python on the same vocab files)

EXTRA = ["", " ", "  ", "\n", " Hello", "  leading", "trailing  ", "a\u3000b", "x\u00a0y", "\u2009thin",
         "😀 emoji 🦙🏳️‍🌈", "中文测试，你好！", "日本語のテキスト", "한국어", "3.14159 and 1234567890",
         "<|im_start|>user\nhi<|im_end|>\n", "<s>hi</s>", "<|endoftext|>", "<|begin_of_text|>x<|eot_id|>",
         " <|im_end|> ", "Hello , world . It ' s I 'm we 're they 've", "don't won't I'll he'd",
         "\t\ttabs\t", "\r\n\r\n", "a  b   c    d", "éàü ñ", "<0x41>", "▁▁x", "ＡＢＣ ｘ", "µ Ω K", "a\u0301",
         "print('hi')\n    return x", " ' ", "hello ? ! . ,",
         "\t \u3000🦙", "中\u2009文", "a \u3000\u3001b", "x\u1680y\u2028z"]  # non-ASCII whitespace vs ranges


@pytest.fixture(scope="module")
def llama():
    """name -> llama_cpp.Llama on that vocab file (closed with the module, not at exit)."""
    import llama_cpp
    models = {}

    def get(name):
        if name not in models:
            models[name] = llama_cpp.Llama(model_path=str(vocab_path(name)), vocab_only=True, verbose=False)
        return models[name]
    yield get
    for m in models.values():
        m.close()


def llama_detokenize(llm, ids, remove_special, special) -> str:
    """llama.cpp's llama_detokenize (Llama.detokenize is a different, Python-side join)."""
    import llama_cpp
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, 1 << 16, remove_special, special)
    return buf.raw[:n].decode("utf-8", "replace")


@pytest.mark.reference
@pytest.mark.parametrize("name", NAMES)
def test_reference_encode_decode(name, llama):
    import llama_cpp  # noqa: F401  (a missing llama-cpp-python must fail, not skip)
    t, llm = tok(name), llama(name)
    for text in [x for x, _ in vocab_files.test_vectors(name)] + EXTRA:
        for add_special in (False, True):
            for special in (False, True):
                want = llm.tokenize(text.encode(), add_bos=add_special, special=special)
                assert t.encode(text, add_special=add_special, special=special) == want, \
                    (text, add_special, special)
                for remove in (False, True):
                    assert t.decode(want, special=special, remove_special=remove) \
                        == llama_detokenize(llm, want, remove, special), (text, remove, special)


ATOMS = list("ab 1.,!'\t\n") + ["中", "é", "😀", "\u3000", "\u00a0", "▁", "<s>", "<|im_end|>", "'s", "<|eot_id|>"]


@pytest.mark.reference
@pytest.mark.parametrize("name", NAMES)
@given(text=st.lists(st.sampled_from(ATOMS), max_size=30).map("".join),
       add_special=st.booleans(), special=st.booleans())
@settings(max_examples=80, deadline=None)
def test_reference_random_text(name, llama, text, add_special, special):
    import llama_cpp  # noqa: F401
    want = llama(name).tokenize(text.encode(), add_bos=add_special, special=special)
    assert tok(name).encode(text, add_special=add_special, special=special) == want


@pytest.mark.reference
@pytest.mark.parametrize("name", NAMES)
def test_reference_pieces_and_special_ids(name, llama):
    import llama_cpp as lc
    t, vocab = tok(name), llama(name)._model.vocab
    buf = ctypes.create_string_buffer(256)
    for i in random.Random(1).sample(range(t.n_vocab), 2000) + sorted(t.eog_ids):
        for special in (False, True):
            n = lc.llama_token_to_piece(vocab, i, buf, 256, 0, special)
            assert t.token_to_piece(i, special) == buf.raw[:n], (i, special)
    assert t.eog_ids == {i for i in range(t.n_vocab) if lc.llama_vocab_is_eog(vocab, i)}
    assert (t.bos_id, t.eos_id, t.add_bos, t.add_eos, t.n_vocab) == (
        lc.llama_vocab_bos(vocab), lc.llama_vocab_eos(vocab), lc.llama_vocab_get_add_bos(vocab),
        lc.llama_vocab_get_add_eos(vocab), lc.llama_vocab_n_tokens(vocab))


def vocab_with(src: str, dst, **overrides):
    """A copy of vocab file SRC with some keys replaced or added (for llama.cpp to load too)."""
    import gguf
    vt_of = {bool: gguf.GGUFValueType.BOOL, str: gguf.GGUFValueType.STRING}
    with open_gguf(vocab_path(src)) as g:
        md = g.metadata
        if overrides.pop("phi3-tokens", False):  # the texts llama.cpp's Phi-3 fix-up needs, two spare ids
            tokens, types = list(md["tokenizer.ggml.tokens"]), list(md["tokenizer.ggml.token_type"])
            tokens[-2:], types[-2:] = ["<|user|>", "<|endoftext|>"], [4, 3]  # USER_DEFINED, CONTROL
            overrides.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types})
        w = gguf.GGUFWriter(str(dst), md["general.architecture"])
        for k in [*md, *(k for k in overrides if k not in md)]:
            if k == "general.architecture":
                continue
            val = overrides.get(k, md.get(k))
            vt, is_array = md.value_type(k) if k in md else (vt_of[type(val)], False)
            if is_array:
                w.add_key_value(k, val, gguf.GGUFValueType.ARRAY, sub_type=vt)
            else:
                w.add_key_value(k, val, vt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
    return dst


# one name per regex list of pretok.REGEXES not covered by the real vocab files above,
# then llama.cpp's SPM variations (per-model RSTRIP for Phi-3, no space prefix)
VARIANTS = [("gpt-2", {"tokenizer.ggml.pre": p}) for p in (
    "default", "qwen35", "starcoder", "falcon", "deepseek-coder", "deepseek-v3", "gpt-4o", "tekken",
    "bailingmoe", "seed-coder", "exaone-moe", "bloom", "olmo", "chatglm-bpe")] + [
    ("llama-spm", {"general.name": "Phi-3.5-MoE-instruct", "phi3-tokens": True}),
    ("llama-spm", {"tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_eos_token": True})]


@pytest.mark.reference
@pytest.mark.parametrize("src, overrides", VARIANTS,
                         ids=lambda v: "-".join(map(str, v.values())) if isinstance(v, dict) else v)
def test_reference_vocab_variants(src, overrides, tmp_path):
    import llama_cpp
    path = vocab_with(src, tmp_path / "vocab.gguf", **overrides)
    t = load_tokenizer(path)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in [x for x, _ in vocab_files.test_vectors(src)] + EXTRA + [
                " </s>  <s> x </s>", "</s>\n", "<|user|>  hi \n<|endoftext|>  x"]:
            for add_special in (False, True):
                want = llm.tokenize(text.encode(), add_bos=add_special, special=True)
                assert t.encode(text, add_special=add_special, special=True) == want, (text, add_special)
                for remove in (False, True):
                    assert t.decode(want, remove_special=remove) == llama_detokenize(llm, want, remove, False), text
    finally:
        llm.close()

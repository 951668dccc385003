"""Tokenizer built from GGUF tokenizer.ggml.* metadata, with llama.cpp's semantics.

HF `tokenizers` does the merging (a BPE model per vocab); the llama.cpp-specific parts
are done here: special-token partition (tokenizer_st_partition), SPM's space prefix and
whitespace escaping, BOS/EOS rules, token attributes and end-of-generation ids, and
token_to_piece / detokenize.
"""
from collections.abc import Iterable, Mapping
from functools import partial

import numpy as np

from localmoe.errors import GGUFFormatError, LocalMoEError, UnsupportedError

from .pretok import PRE
from .text import as_text
from .stream import Detokenizer

# llama_token_attr bits
UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 2, 4, 8, 16, 32
LSTRIP, RSTRIP = 128, 256
# GGUF token_type (1..6) -> attr; anything else is UNDEFINED (0)
_TYPE_ATTR = np.array([0, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE], np.int32)

# token texts llama.cpp turns into end-of-generation ids (llama_vocab::impl::load)
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[")
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
# FIM roles whose token llama.cpp finds by text (and marks CONTROL); pad/rep/sep also end generation
_FIM_TEXTS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
            "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
            "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
            "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
_SPACE = "\u2581"  # SPM's escaped space
_C_SPACE = " \t\n\v\f\r"  # C isspace(), used by LSTRIP/RSTRIP


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (llama.cpp unicode_byte_to_utf8_map)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = (b for b in range(256) if b not in table)
    table.update((b, chr(256 + n)) for n, b in enumerate(extra))
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


class InvalidTokenError(LocalMoEError, IndexError):
    """A token id outside the vocabulary."""


def _check_types(md: Mapping) -> None:
    """The tokenizer keys read below hold GGUF's type for them (files come from strangers):
    anything else is a GGUFFormatError naming the key, not a TypeError deep inside."""
    def want(key, ok, what):
        v = md.get(key)
        if v is not None and not ok(v):
            raise GGUFFormatError(f"{key} must be {what}, got {type(v).__name__} {str(v)[:40]!r}")

    def array_of(kinds):
        return lambda v: isinstance(v, (list, tuple, np.ndarray)) and np.asarray(v).dtype.kind in kinds

    def strings(v):
        return isinstance(v, (list, tuple)) and all(isinstance(t, str) for t in v)

    g = "tokenizer.ggml."
    for key in ("model", "pre"):
        want(g + key, lambda v: isinstance(v, str), "a string")
    for key in ("tokens", "merges"):
        want(g + key, strings, "an array of strings")
    want(g + "token_type", array_of("iu"), "an array of integers")
    want(g + "scores", array_of("iuf"), "an array of numbers")
    for key in ("add_space_prefix", "add_bos_token", "add_eos_token"):
        want(g + key, lambda v: isinstance(v, (bool, np.bool_)), "a boolean")
    for role in ("bos", "eos", "eot", "eom", "unknown", "padding", *(f"fim_{k}" for k in _FIM_TEXTS)):
        want(f"{g}{role}_token_id", lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool),
             "an integer")


class Tokenizer:
    """llama.cpp-compatible tokenizer for SPM ("llama") and byte-level BPE ("gpt2") vocabularies."""

    def __init__(self, md: Mapping):
        _check_types(md)
        model = md.get("tokenizer.ggml.model")
        if model is None:
            raise GGUFFormatError("no tokenizer in this file (tokenizer.ggml.model is missing)")
        tokens = md.get("tokenizer.ggml.tokens")
        if not tokens:
            raise GGUFFormatError("tokenizer.ggml.tokens is missing or empty")
        self.tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp
        self.n_vocab = n = len(self.tokens)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        if len(self.vocab) != n:
            raise GGUFFormatError("tokenizer.ggml.tokens has duplicate entries")
        self.model = model
        self.pre = md.get("tokenizer.ggml.pre") or "default"
        if model == "llama":
            self.kind = "spm"
            ids = {"bos": 1, "eos": 2, "unk": 0}
            self.add_space_prefix, self.clean_spaces, self.add_bos = True, False, True
            self._pre = None
        elif model == "gpt2":
            self.kind = "bpe"
            self._pre = PRE.get(self.pre)
            if self._pre is None:
                raise UnsupportedError(f"pre-tokenizer '{self.pre}' is not supported "
                                       f"(supported: {', '.join(sorted(PRE))})")
            ids = {"bos": 11, "eos": 11} if self._pre.has_bos else {"eos": 11}
            self.add_space_prefix, self.clean_spaces = False, self._pre.clean_spaces
            self.add_bos = self._pre.add_bos
        else:
            raise UnsupportedError(f"tokenizer model '{model}' is not supported (only 'llama' and 'gpt2')")
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", self.add_space_prefix))
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", self.add_bos))
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))

        ids = {k: v for k, v in ids.items() if v < n}  # out-of-range defaults are disabled
        for role, key in (("bos", "bos"), ("eos", "eos"), ("eot", "eot"), ("eom", "eom"),
                          ("unk", "unknown"), ("pad", "padding")):
            v = md.get(f"tokenizer.ggml.{key}_token_id")
            if v is not None and 0 <= v < n:
                ids[role] = int(v)
        self._init_attrs(md)
        self._init_special_ids(ids, md)
        self._hf = self._build_hf(md)
        self._pieces: dict[tuple[int, bool], bytes] = {}

    @classmethod
    def from_gguf(cls, metadata: Mapping) -> "Tokenizer":
        """From a Mapping of GGUF keys (e.g. open_gguf(path).metadata) to Python values."""
        return cls(metadata)

    # --- vocab set-up --------------------------------------------------------

    def _init_attrs(self, md: Mapping) -> None:
        types = md.get("tokenizer.ggml.token_type")
        if types is None:
            self.attrs = np.full(self.n_vocab, NORMAL, np.int32)
        else:
            t = np.asarray(types, np.int64)
            if t.size < self.n_vocab:
                raise GGUFFormatError(
                    f"tokenizer.ggml.token_type has {t.size} entries for {self.n_vocab} tokens")
            t = t[:self.n_vocab]
            self.attrs = np.where((t >= 0) & (t < len(_TYPE_ATTR)), _TYPE_ATTR[np.clip(t, 0, 6)], 0)
            self.attrs = self.attrs.astype(np.int32)
        scores = md.get("tokenizer.ggml.scores")
        self.scores = np.zeros(self.n_vocab, np.float32) if scores is None else \
            np.asarray(scores, np.float32)[:self.n_vocab]
        if self.scores.size < self.n_vocab:
            raise GGUFFormatError(
                f"tokenizer.ggml.scores has {self.scores.size} entries for {self.n_vocab} tokens")

    def _find(self, texts: Iterable[str]) -> list[int]:
        """Ids of those texts that are tokens, in the order of `texts`."""
        return [self.vocab[t] for t in texts if t in self.vocab]

    def _init_special_ids(self, ids: dict[str, int], md: Mapping) -> None:
        attrs = self.attrs
        # llama.cpp picks these by text when the metadata has no id (the first match in
        # hash order; we take the first text in list order) and forces them to CONTROL
        for role, texts in (("eot", _EOT_TEXTS), ("eom", ("<|eom_id|>",)),
                            *((f"fim_{k}", v) for k, v in _FIM_TEXTS.items())):
            key = f"tokenizer.ggml.{role}_token_id"
            v = md.get(key)
            if v is not None and 0 <= v < self.n_vocab:
                ids[role] = int(v)
            elif found := self._find(texts):
                ids[role] = found[0]
                attrs[found[0]] |= CONTROL
        eog = {ids[r] for r in ("fim_pad", "fim_rep", "fim_sep") if r in ids}
        for i in self._find(_EOG_TEXTS):
            eog.add(i)
            attrs[i] |= CONTROL
        for i in self._find(("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")):
            attrs[i] = USER_DEFINED  # gpt-oss: always rendered
        eog.update(ids[r] for r in ("eos", "eot", "eom") if r in ids)
        texts = {self.tokens[i]: i for i in eog}
        if "<|end|>" in texts and (("<|return|>" in texts and "<|call|>" in texts)
                                   or ("<|calls|>" in texts and "<|flush|>" in texts)):
            eog.discard(texts["<|end|>"])  # o200k_harmony / solar-open: <|end|> ends a message only
            attrs[texts["<|end|>"]] = USER_DEFINED
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])
            attrs[texts["</s>"]] = NORMAL
        self._ids = ids
        self.eog_ids = frozenset(eog)
        name = str(md.get("general.name", "")).lower()
        special = np.flatnonzero(attrs & (CONTROL | USER_DEFINED | UNKNOWN))
        if "phi-3" in name or "phi3" in name:  # llama.cpp's per-model attribute fix-up
            attrs[special] |= RSTRIP
            for t, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
                if (i := self.vocab.get(t)) is not None:
                    attrs[i] = attrs[i] | RSTRIP if on else attrs[i] & ~RSTRIP
        # longest first, as tokenizer_st_partition tries them (ties: lower id first);
        # [special] -> (id, text, attr) of the tokens it cuts out
        self._special = sorted(special.tolist(), key=lambda i: (-len(self.tokens[i].encode()), i))
        every = [(i, self.tokens[i], int(attrs[i])) for i in self._special]
        self._special_texts = {True: every, False: [s for s in every if not s[2] & (CONTROL | UNKNOWN)]}

    def _build_hf(self, md: Mapping):
        from tokenizers import Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers
        if self.kind == "spm":
            unk = self.tokens[self._ids["unk"]] if "unk" in self._ids else None
            return HFTokenizer(models.BPE(vocab=self.vocab, merges=self._spm_merges(), unk_token=unk,
                                          byte_fallback=True))
        merges = md.get("tokenizer.ggml.merges")
        if merges is None:
            raise GGUFFormatError("BPE vocabulary without tokenizer.ggml.merges")
        self.n_dropped_merges = 0
        bpe = partial(models.BPE, vocab=self.vocab, ignore_merges=self._pre.ignore_merges)
        model = None
        if len(set(merges)) == len(merges):  # fast path: HF itself checks the merges are in the vocab
            try:
                model = bpe(merges=[tuple(m.split(" ", 1)) for m in merges])
            except Exception:  # HF raises a bare Exception for a merge it cannot use
                pass
        if model is None:
            model = bpe(merges=self._checked_merges(merges))
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), "isolated") for r in self._pre.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return hf

    def _checked_merges(self, merges: list[str]) -> list[tuple[str, str]]:
        """GGUF "a b" merges as pairs, split as llama.cpp does; the first rank of a pair wins.

        Merges whose parts or result are not tokens are dropped (HF cannot represent them;
        llama.cpp would only fall back to single bytes for them).
        """
        pairs: dict[tuple[str, str], None] = {}
        for m in merges:
            p = m.find(" ", 1)
            pairs.setdefault((m[:p], m[p + 1:]) if p > 0 else ("", ""))
        vocab = self.vocab
        kept = [(a, b) for a, b in pairs if a in vocab and b in vocab and a + b in vocab]
        self.n_dropped_merges = len(pairs) - len(kept)
        return kept

    def _spm_merges(self) -> list[tuple[str, str]]:
        """SPM as BPE: every split of a token into two tokens, best token score first.

        llama.cpp's SPM merges any adjacent pair whose concatenation is a token, highest
        score first; ranking the pairs by their result's score gives the same order (only
        pairs of equal score may differ: llama.cpp takes the leftmost, HF the lower rank).
        """
        vocab, scored = self.vocab, []
        for t, i in vocab.items():
            for k in range(1, len(t)):
                a, b = t[:k], t[k:]
                if a in vocab and b in vocab:
                    scored.append((-self.scores[i], i, a, b))
        scored.sort(key=lambda s: (s[0], s[1]))
        return [(a, b) for _, _, a, b in scored]

    # --- properties ----------------------------------------------------------

    bos_id = property(lambda self: self._ids.get("bos"))
    eos_id = property(lambda self: self._ids.get("eos"))
    eot_id = property(lambda self: self._ids.get("eot"))
    eom_id = property(lambda self: self._ids.get("eom"))
    unk_id = property(lambda self: self._ids.get("unk"))
    pad_id = property(lambda self: self._ids.get("pad"))

    def is_eog(self, token: int) -> bool:
        return token in self.eog_ids

    # --- encoding ------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, special: bool = False) -> list[int]:
        """llama_tokenize: add_special adds BOS/EOS where the vocab says to; special=True
        parses control-token text (e.g. "<|im_end|>") into those tokens. Invalid UTF-8 (lone
        surrogates in a str, bad bytes in bytes) becomes U+FFFD (localmoe.tokenizer.text)."""
        text = as_text(text)
        out: list[int] = []
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise UnsupportedError("this vocabulary asks for a BOS token but has none")
            out.append(self.bos_id)
        prev_special = True  # SPM: a space prefix goes on text that starts or follows a special token
        for frag in self.partition(text, special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            if self.kind == "spm":
                frag = ((" " if self.add_space_prefix and prev_special else "") + frag).replace(" ", _SPACE)
            out += self._hf.encode(frag, add_special_tokens=False).ids
            prev_special = False
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise UnsupportedError("this vocabulary asks for an EOS token but has none")
            out.append(self.eos_id)
        return out

    def special_token_texts(self, special: bool) -> list[str]:
        """Texts that partition() cuts out as tokens: control ones too when `special`."""
        return [t for _, t, _ in self._special_texts[special]]

    def partition(self, text: str, special: bool) -> list:
        """tokenizer_st_partition: cut special-token text out of `text`, longest token first.

        Control and unknown tokens only when `special`; user-defined ones always.
        """
        if not text:
            return []
        frags: list = [text]
        # a token absent from the text is absent from every fragment of it
        for tid, tt, attr in [s for s in self._special_texts[special] if s[1] in text]:
            new: list = []
            for f in frags:
                if not isinstance(f, str) or tt not in f:
                    new.append(f)
                    continue
                parts = f.split(tt)
                for k, part in enumerate(parts):
                    if k > 0 and attr & RSTRIP:
                        part = part.lstrip(_C_SPACE)
                    if k < len(parts) - 1 and attr & LSTRIP:
                        part = part.rstrip(_C_SPACE)
                    if part:
                        new.append(part)
                    if k < len(parts) - 1:
                        new.append(tid)
            frags = new
        return frags

    # --- decoding ------------------------------------------------------------

    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        """llama_token_to_piece: the bytes of one token. Control and unknown tokens are
        empty unless `special`; unused/undefined ones are always empty."""
        key = (token, special)
        piece = self._pieces.get(key)
        if piece is None:
            piece = self._pieces[key] = self._piece(token, special)
        return piece

    def _piece(self, token: int, special: bool) -> bytes:
        if not 0 <= token < self.n_vocab:
            raise InvalidTokenError(f"token id {token} is outside the vocabulary (0..{self.n_vocab - 1})")
        attr, text = int(self.attrs[token]), self.tokens[token]
        if attr & (UNKNOWN | CONTROL):
            return text.encode() if special else b""
        if attr & USER_DEFINED:
            return text.encode()
        if attr & NORMAL:
            if self.kind == "spm":
                return text.replace(_SPACE, " ").encode()
            return _byte_decode(text)
        if attr & BYTE:
            return bytes([int(text[3:5], 16)])
        return b""

    def decode(self, tokens: Iterable[int], special: bool = False, remove_special: bool = False) -> str:
        """llama_detokenize: pieces joined, SPM's first leading space dropped, clean_spaces
        applied; invalid UTF-8 becomes U+FFFD. remove_special drops a leading BOS and
        trailing EOS where the vocab adds them."""
        d = Detokenizer(self, special=special, remove_special=remove_special)
        return "".join([d.feed(t) for t in tokens]) + d.flush()


def _byte_decode(text: str) -> bytes:
    """llama_decode_text: GPT-2 byte characters back to bytes (unknown ones as llama.cpp marks them)."""
    try:
        return bytes([_UNICODE_TO_BYTE[c] for c in text])
    except KeyError:
        out = bytearray()
        for c in text:
            b = _UNICODE_TO_BYTE.get(c)
            if b is None:
                out += b"[UNK_BYTE_0x" + c.encode().hex().encode() + text.encode() + b"]"
            else:
                out.append(b)
        return bytes(out)

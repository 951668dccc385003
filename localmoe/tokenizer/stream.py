"""Token ids -> text, one token at a time (llama_detokenize semantics, streamed)."""
import codecs
import re


class _Pass:
    """One of llama_detokenize's clean_spaces passes, as a streaming byte filter.

    Each pass is a left-to-right scan that looks at most `need` bytes past a match
    start, so bytes further than that from the end are already decided.
    """

    def __init__(self, pattern: bytes, repl: bytes, need: int):
        self.rx, self.repl, self.need = re.compile(pattern), repl, need
        self.rest = b""

    def feed(self, data: bytes, final: bool = False) -> bytes:
        buf = self.rest + data
        limit = len(buf) if final else len(buf) - self.need
        out, pos = [], 0
        for m in self.rx.finditer(buf):
            if m.start() >= limit:
                break  # might change once more bytes arrive
            out += (buf[pos:m.start()], self.repl)
            pos = m.end()
        end = max(pos, limit)
        out.append(buf[pos:end])
        self.rest = buf[end:]
        return b"".join(out)


def _clean_passes() -> list[_Pass]:
    return [
        _Pass(rb" (?=[?!.,])", b"", 1),          # " ?", " !", " .", " ,"
        _Pass(rb" ' ", b"'", 2),                 # single apostrophe between spaces
        _Pass(rb" (?='(?:[sm]|re|ve))", b"", 3),  # " 's", " 'm", " 're", " 've"
    ]


class Detokenizer:
    """Feed token ids one by one; get text only once it is complete UTF-8.

    "".join(feed(t) for t in ids) + flush() == tokenizer.decode(ids, ...) with the same
    flags. at_start=False continues a text (e.g. a completion after its prompt): the first
    token keeps its leading space, as llama.cpp's streaming token_to_piece does.
    """

    def __init__(self, tokenizer, special: bool = False, remove_special: bool = False,
                 at_start: bool = True):
        self.tok, self.special, self.remove_special = tokenizer, special, remove_special
        self._first = at_start
        self._held_eos = False
        self._passes = _clean_passes() if tokenizer.clean_spaces else []
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token: int) -> str:
        tok = self.tok
        out = b""
        if self._held_eos:  # it was not the last token after all
            out = self._piece(tok.eos_id)
            self._held_eos = False
        if self.remove_special and tok.add_eos and token == tok.eos_id:
            self._held_eos = True
            return self._emit(out)
        return self._emit(out + self._piece(token))

    def flush(self) -> str:
        """Text still held back (a trailing space clean_spaces may drop, an incomplete character)."""
        self._held_eos = False
        data = b""
        for p in self._passes:
            data = p.feed(data, final=True)
        return self._utf8.decode(data, final=True)

    def _piece(self, token: int) -> bytes:
        tok = self.tok
        if not self._first:
            return tok.token_to_piece(token, self.special)
        self._first = False
        if self.remove_special and tok.add_bos and token == tok.bos_id:
            return b""  # llama.cpp then keeps the next token's leading space
        piece = tok.token_to_piece(token, self.special)
        return piece[1:] if tok.add_space_prefix and piece[:1] == b" " else piece

    def _emit(self, data: bytes) -> str:
        for p in self._passes:
            data = p.feed(data)
        return self._utf8.decode(data)

"""The rule for text that enters localmoe (prompts, chat messages, stop strings, saved chats):
bytes that are not valid UTF-8 become U+FFFD replacement characters, as in a decode with
errors="replace". Python hands such bytes over as lone surrogates (argv and stdin use
surrogateescape); any other lone surrogate becomes U+FFFD too."""
from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """text with invalid UTF-8 (surrogate-escaped bytes, lone surrogates) as U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:  # surrogate-escaped bytes: decode them again, so one bad sequence gives one U+FFFD
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # lone surrogates that escape no byte
        return _SURROGATE.sub("\ufffd", text)


# The longest text encode() takes: past some hundred MB HF tokenizers panics (in Rust, which
# aborts the process), and no context holds this many characters' tokens.
MAX_TEXT_CHARS = 32 << 20


def as_text(text) -> str:
    """A str to tokenize: cleaned as above, bytes decoded with U+FFFD, length bounded."""
    from localmoe.errors import LocalMoEError
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    if not isinstance(text, str):
        raise LocalMoEError(f"text to tokenize must be a str, got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise LocalMoEError(f"text of {len(text)} characters is too long to tokenize "
                            f"(at most {MAX_TEXT_CHARS})")
    return clean_text(text)

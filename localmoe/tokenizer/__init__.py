"""Tokenizer built from GGUF tokenizer.ggml.* metadata (llama.cpp semantics)."""
from .core import InvalidTokenError, Tokenizer
from .stream import Detokenizer

__all__ = ["Tokenizer", "Detokenizer", "InvalidTokenError", "load_tokenizer"]


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a GGUF file (a model or a vocab-only file)."""
    from localmoe.gguf_file import open_gguf
    with open_gguf(path) as g:
        return Tokenizer.from_gguf(g.metadata)

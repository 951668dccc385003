"""localmoe: a runner and quantizer for Mixture-of-Experts GGUF models.

The API: load, generate, chat, perplexity, quantize (and load_tokenizer). Each import
happens on first use, so that `import localmoe` stays cheap (no numba).
"""
from __future__ import annotations

import contextlib
import os
import sys
import types

from .errors import GGUFFormatError, LocalMoEError, UnsupportedError

__version__ = "0.1.0"
__all__ = ["GGUFFormatError", "LocalMoEError", "UnsupportedError", "__version__", "chat", "generate", "load",
           "load_tokenizer", "perplexity", "quantize"]

_LAZY = {"load": "localmoe.model", "load_tokenizer": "localmoe.tokenizer",
         "quantize": "localmoe.quantizer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'localmoe' has no attribute {name!r}")


@contextlib.contextmanager
def _opened(model_or_path, **load_opts):
    """A loaded Model as is, or a path loaded for the duration of the block."""
    if not isinstance(model_or_path, (str, os.PathLike)):
        yield model_or_path
        return
    from localmoe.model import load
    m = load(model_or_path, **load_opts)
    try:
        yield m
    finally:
        m.close()


def generate(model_or_path, prompt: str, stream: bool = False, **sampling):
    """The completion of `prompt` as one string, or an iterator of text pieces when stream=True.
    sampling: Model.generate's max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop."""
    def pieces():
        with _opened(model_or_path) as m:
            yield from m.generate(prompt, **sampling)
    return pieces() if stream else "".join(pieces())


def chat(model_or_path, messages, stop=None, max_tokens: int = -1, **sampling) -> str:
    """One assistant reply to `messages` ([{"role": "system"|"user"|"assistant", "content": ...}],
    a system message first if any, the last one from the user), through the model's chat template.
    stop: strings that end the reply (not included); max_tokens < 0: until the turn ends or the
    context is full. sampling: temperature, top_k, top_p, min_p, repeat_penalty, seed."""
    from localmoe.chat import ChatError, ChatSession
    from localmoe.sampling import StopStrings
    msgs = [dict(m) for m in messages]
    for i, m in enumerate(msgs):
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ChatError(f"message {i} needs a role (system, user or assistant) and a string content")
    system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else None
    if not msgs or msgs[-1]["role"] != "user" or any(m["role"] == "system" for m in msgs):
        raise ChatError("messages must be an optional system message, then turns ending with a user message")
    stops = StopStrings([stop] if isinstance(stop, str) else list(stop or []))
    with _opened(model_or_path) as m:
        session = ChatSession(m, system=system, max_tokens=max_tokens, **sampling)
        session.messages = msgs[:-1]
        reply = session.send(msgs[-1]["content"])
        out = []
        for piece in reply:
            text, stopped = stops.feed(piece)
            out.append(text)
            if stopped:
                reply.close()
                break
        else:
            out.append(stops.flush())
    return "".join(out)


def perplexity(model_or_path, text_or_tokens, n_ctx: int = 256, n_chunks: int | None = None, progress=None):
    """llama.cpp's perplexity of a text or token ids (see localmoe.perplexity.perplexity)."""
    from localmoe.perplexity import perplexity as run
    with _opened(model_or_path, n_ctx=n_ctx) as m:
        return run(m, text_or_tokens, n_ctx=n_ctx, n_chunks=n_chunks, progress=progress)


class _Package(types.ModuleType):
    """Importing the submodules localmoe.chat and localmoe.perplexity would rebind those names on
    the package to the modules; the names stay the API functions (the modules are still importable)."""

    def __setattr__(self, name, value):
        if name in ("chat", "perplexity") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

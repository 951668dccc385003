"""Perplexity of a text, computed as llama.cpp's perplexity tool does (tools/perplexity, perplexity()).

The text is tokenized whole (BOS per the vocab), cut into n_tokens // n_ctx chunks; each
chunk runs from an empty cache, its first token replaced by BOS when the vocab adds BOS,
and only the second half is scored: the logits at positions n_ctx/2 .. n_ctx-2 predict
the tokens after them. Log-softmax sums are float64, like llama.cpp's.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localmoe.errors import LocalMoEError

MIN_CTX = 4  # so that each chunk scores at least one token


class PerplexityError(LocalMoEError):
    """A text, file or context length perplexity cannot use."""


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_err: float               # llama.cpp's +/-: ppl * std(nll) / sqrt(n_scored - 1)
    nll_mean: float              # nats per scored token
    n_chunks: int
    n_scored: int
    running: tuple[float, ...]   # the estimate after each chunk, llama.cpp's [1]..,[2]..


def read_text(path) -> str:
    """The file as llama.cpp's -f reads it: whole, one trailing newline dropped."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise PerplexityError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise PerplexityError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text[:-1] if text.endswith("\n") else text


def chunks(tokens: Sequence[int], n_ctx: int, n_chunks: int | None, bos_id: int | None) -> list[list[int]]:
    """The chunks llama.cpp evaluates; bos_id (when the vocab adds BOS) replaces each first token."""
    if n_ctx < MIN_CTX:
        raise PerplexityError(f"the context must be at least {MIN_CTX} tokens, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise PerplexityError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context "
                              f"of {n_ctx}; the text tokenizes to only {len(tokens)} tokens")
    if n_chunks is not None and n_chunks < 1:
        raise PerplexityError(f"the number of chunks must be >= 1, got {n_chunks}")
    n = len(tokens) // n_ctx if n_chunks is None else min(n_chunks, len(tokens) // n_ctx)
    out = [list(tokens[i * n_ctx:(i + 1) * n_ctx]) for i in range(n)]
    if bos_id is not None:
        for c in out:
            c[0] = bos_id
    return out


def chunk_nll(logits: np.ndarray, targets: Sequence[int]) -> tuple[float, float]:
    """(sum, sum of squares) of -log p(targets[i+1] | logits[i]) over the second half of one chunk.
    logits f32[n_ctx, n_vocab]; targets: the chunk's original tokens (n_ctx)."""
    n_ctx = len(targets)
    first = n_ctx // 2
    rows = np.asarray(logits[first:n_ctx - 1], dtype=np.float32)
    tok = np.asarray(targets[first + 1:n_ctx], dtype=np.int64)
    mx = rows.max(axis=1)
    sum_exp = np.exp(rows - mx[:, None]).sum(axis=1, dtype=np.float64)  # expf terms, double sum
    nll = -((rows[np.arange(tok.size), tok] - mx).astype(np.float64) - np.log(sum_exp))
    return float(nll.sum()), float((nll * nll).sum())


def from_logits(logits_of: Callable[[list[int]], np.ndarray], tokens: Sequence[int], n_ctx: int,
                n_chunks: int | None = None, bos_id: int | None = None,
                progress: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """Perplexity with logits_of(chunk) -> f32[n_ctx, n_vocab] run from an empty cache per chunk.
    progress(i, n_chunks, running_ppl) is called after chunk i (1-based)."""
    todo = chunks(tokens, n_ctx, n_chunks, bos_id)
    nll = nll2 = 0.0
    count = 0
    running = []
    for i, chunk in enumerate(todo):
        s, s2 = chunk_nll(logits_of(chunk), tokens[i * n_ctx:(i + 1) * n_ctx])
        nll, nll2, count = nll + s, nll2 + s2, count + n_ctx - n_ctx // 2 - 1
        running.append(math.exp(nll / count))
        if progress is not None:
            progress(i + 1, len(todo), running[-1])
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    err = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else math.nan
    return PerplexityResult(ppl, err, mean, len(todo), count, tuple(running))


def perplexity(model, text_or_tokens: str | Sequence[int], n_ctx: int = 256, n_chunks: int | None = None,
               progress: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """Perplexity of a loaded Model on a text (tokenized with BOS per the vocab) or on token ids."""
    if n_ctx > model.args.n_ctx_train:
        raise PerplexityError(f"a context of {n_ctx} tokens is longer than the model's training context "
                              f"({model.args.n_ctx_train}): use --ctx {model.args.n_ctx_train} or less")
    if n_ctx > model.n_ctx:
        raise PerplexityError(f"the model was loaded with a {model.n_ctx}-token context; "
                              f"load it with n_ctx >= {n_ctx}")
    tok = model.tokenizer
    if tok.add_eos:
        raise PerplexityError("this vocab appends EOS to every text; perplexity (like llama.cpp's) "
                              "needs one that does not")
    tokens = model.tokenize(text_or_tokens) if isinstance(text_or_tokens, str) else list(text_or_tokens)
    bos = tok.bos_id if tok.add_bos else None
    return from_logits(model.eval, tokens, n_ctx, n_chunks, bos, progress)

"""llama.cpp's perplexity through llama-cpp-python, for the tests and benchmarks/quality.py.

Same chunks, BOS rule and scoring as localmoe.perplexity; only the logits come from llama.cpp
(each chunk one decode call from an emptied cache, as the perplexity tool does).
"""
from __future__ import annotations

from collections.abc import Sequence

import llama_cpp
import numpy as np

from localmoe.perplexity import PerplexityResult, from_logits


def llama_perplexity(model_path, tokens: Sequence[int], n_ctx: int, n_chunks: int | None = None,
                     n_threads: int = 2) -> PerplexityResult:
    llm = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=n_threads, verbose=False)
    try:
        bos = llm.token_bos() if llm._model.add_bos_token() else None

        def logits_of(chunk: list[int]) -> np.ndarray:
            llm.reset()
            llm.eval(chunk)
            return np.array(llm.scores[:n_ctx], dtype=np.float32)

        return from_logits(logits_of, list(tokens), n_ctx, n_chunks, bos)
    finally:
        llm.close()

"""Per-layer K/V cache in fp16, like llama.cpp's default (type_k = type_v = f16)."""
from __future__ import annotations

import numpy as np

from localmoe.errors import LocalMoEError


class ContextOverflowError(LocalMoEError):
    """More tokens than the context (n_ctx) holds."""


class KVCache:
    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim_k: int, head_dim_v: int):
        self.n_ctx = n_ctx
        self.k = np.zeros((n_layer, n_ctx, n_head_kv, head_dim_k), np.float16)  # f16[n_layer, n_ctx, n_head_kv, hd_k]
        self.v = np.zeros((n_layer, n_ctx, n_head_kv, head_dim_v), np.float16)  # f16[n_layer, n_ctx, n_head_kv, hd_v]
        self.n_past = 0

    def check_room(self, n_new: int) -> None:
        if self.n_past + n_new > self.n_ctx:
            raise ContextOverflowError(
                f"context overflow: {self.n_past} tokens in the cache + {n_new} new > n_ctx={self.n_ctx} "
                f"(load the model with a larger n_ctx / --ctx)")

    def store(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """k f32[n_tok, n_head_kv, hd_k], v f32[n_tok, n_head_kv, hd_v] at positions n_past.."""
        n = k.shape[0]
        self.k[layer, self.n_past:self.n_past + n] = k
        self.v[layer, self.n_past:self.n_past + n] = v

    def advance(self, n_tok: int) -> None:
        self.n_past += n_tok

    def reset(self) -> None:
        self.n_past = 0

    def truncate(self, n: int) -> None:
        """Forget positions n.. (a chat turn that diverges from the cached tokens there)."""
        if not 0 <= n <= self.n_past:
            raise ValueError(f"cannot truncate a cache of {self.n_past} tokens to {n}")
        self.n_past = n

"""DeepSeek-V2 / V2-Lite / V3 / R1: multi-head latent attention (MLA), YaRN RoPE
with DeepSeek's mscale folded into the KQ scale, leading dense layers, shared
experts, and routing by softmax (V2) or sigmoid + selection bias with
group-limited top-k (V3). Normal (pairwise) RoPE on the trailing n_rot dims.

Attention comes in the two forms llama.cpp 0.3.36 runs, chosen like llama.cpp
by the presence of `attention.key_length_mla`:
- MLA (current converters, split attn_k_b / attn_v_b): the cache holds only the
  compressed latent + roped key (kv_lora_rank + n_rot per token, fp16; V is a view
  of its first kv_lora_rank columns), attn_k_b is absorbed into q and attn_v_b
  decompresses the attention output per head.
- legacy MHA (older converters, one attn_kv_b): K/V are decompressed per head
  and cached as ordinary multi-head attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from numba import njit

from localmoe.errors import GGUFFormatError, UnsupportedError
from localmoe.layers import apply_rope, attention, rms_norm, sigmoid, softmax
from localmoe.moe import swiglu_ffn

from . import base
from .deepseek import check_shared_experts

GATING = {1: "softmax", 2: "sigmoid"}  # llama.cpp's expert_gating_func values we run


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    n_layer_dense_lead: int = 0
    q_lora_rank: int = 0          # 0: attn_q directly (V2-Lite)
    kv_lora_rank: int = 0
    head_dim_qk: int = 0          # per-head q/k width once decompressed: nope + n_rot
    head_dim_v_mla: int = 0       # per-head v width once decompressed
    mla: bool = True              # split attn_k_b/attn_v_b with a latent cache, else legacy attn_kv_b MHA
    gating: str = "softmax"
    expert_weights_norm: bool = False
    n_group: int = 0              # group-limited routing: keep the n_group_used best of n_group groups
    n_group_used: int = 0
    rope_neox = False

    @property
    def n_rot(self) -> int:
        return self.rope.n_rot

    @classmethod
    def from_gguf(cls, g, n_expert_used=None, **extra):
        a = g.arch
        int_key, float_key = base.int_key, base.float_key
        n_embd = int_key(g, "embedding_length", required=True, lo=1)
        n_head = int_key(g, "attention.head_count", required=True, lo=1)
        n_ctx_train = int_key(g, "context_length", required=True, lo=1)
        kv_lora = int_key(g, "attention.kv_lora_rank", required=True, lo=1)
        hd_k = int_key(g, "attention.key_length", n_embd // n_head, lo=1)
        hd_v = int_key(g, "attention.value_length", n_embd // n_head, lo=1)
        mla = bool(int_key(g, "attention.key_length_mla", 0)) and bool(int_key(g, "attention.value_length_mla", 0))
        hd_qk = int_key(g, "attention.key_length_mla", hd_k) if mla else hd_k
        hd_v_mla = int_key(g, "attention.value_length_mla", hd_v) if mla else hd_v
        n_rot = int_key(g, "rope.dimension_count", hd_k)
        if not 0 < n_rot < hd_qk or n_rot % 2:
            raise GGUFFormatError(f"{a}.rope.dimension_count={n_rot} must be even and below the per-head key length "
                                  f"{a}.attention.{'key_length_mla' if mla else 'key_length'}={hd_qk}")
        if mla and (hd_k, hd_v) != (kv_lora + n_rot, kv_lora):  # the latent cache's row: what llama.cpp sizes it by
            raise GGUFFormatError(f"{a}: with MLA, {a}.attention.key_length={hd_k} and {a}.attention.value_length="
                                  f"{hd_v} must be {a}.attention.kv_lora_rank={kv_lora} + rope.dimension_count={n_rot}"
                                  f" = {kv_lora + n_rot} and {kv_lora}")
        gating_id = int_key(g, "expert_gating_func", 1) or 1  # 0/absent: softmax, as llama.cpp for V2 files
        if gating_id not in GATING:
            raise UnsupportedError(f"deepseek2: expert_gating_func={gating_id} is not supported "
                                   f"(have: {', '.join(f'{k}={v}' for k, v in GATING.items())})")
        nextn = int_key(g, "nextn_predict_layers", 0)
        if nextn:
            raise UnsupportedError(f"{a}.nextn_predict_layers={nextn}: files with multi-token-prediction layers "
                                   f"are not supported")
        n_expert = int_key(g, "expert_count", 0)
        n_group, n_group_used = int_key(g, "expert_group_count", 0), int_key(g, "expert_group_used_count", 0)
        if n_group > 1 and (n_group >= n_expert or n_expert % n_group or not 0 < n_group_used < n_group):
            raise GGUFFormatError(f"deepseek2: {n_expert} experts cannot form {n_group} groups "
                                  f"of which {n_group_used} are used ({a}.expert_count, {a}.expert_group_count, "
                                  f"{a}.expert_group_used_count)")

        # [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]: the converter stores 0.1 * mscale_all_dim
        raw_log_mul = float_key(g, "rope.scaling.yarn_log_multiplier", 0.0)
        log_mul = raw_log_mul / 0.1
        # llama.cpp's deepseek2 special case sets YaRN's mscale to mscale_all_dim: their ratio is 1
        rope = cls.rope_from_gguf(g, n_rot, n_ctx_train, yarn_log_mul=log_mul, yarn_mscale=log_mul)
        rope = replace(rope, beta_fast=32.0, beta_slow=1.0)  # llama.cpp reads no yarn_beta_* for deepseek2
        # YaRN's magnitude correction goes into the KQ scale (both q and k carry it), not into cos/sin
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the error below
            kq_scale = float(_kq_scale(np.float32(rope.attn_factor), np.float32(rope.freq_scale),
                                       np.float32(raw_log_mul) / np.float32(0.1), np.float32(hd_qk)))
        if not np.isfinite(kq_scale):
            raise GGUFFormatError(f"{a}.rope.scaling.yarn_log_multiplier={raw_log_mul}, rope.scaling.factor and "
                                  f"{a}.rope.scaling.attn_factor give an attention scale of {kq_scale}")

        # MLA caches one latent "head" and no V (read as a view of K's first kv_lora_rank columns)
        cache = dict(n_head_kv=1, head_dim_k=kv_lora + n_rot, head_dim_v=0) if mla else {}
        return super().from_gguf(
            g, n_expert_used, rope=rope, kq_scale=kq_scale, **cache,
            n_layer_dense_lead=int_key(g, "leading_dense_block_count", 0),
            q_lora_rank=int_key(g, "attention.q_lora_rank", 0), kv_lora_rank=kv_lora,
            head_dim_qk=hd_qk, head_dim_v_mla=hd_v_mla, mla=mla, gating=GATING[gating_id],
            expert_weights_norm=base.bool_key(g, "expert_weights_norm", False),
            n_group=n_group, n_group_used=n_group_used, **extra)

    def is_moe_layer(self, il):
        return il >= self.n_layer_dense_lead

    def layer_why(self, il):
        return self.key("leading_dense_block_count", self.n_layer_dense_lead)

    def check(self, g):
        if not self.mla and self.n_head_kv != self.n_head:  # legacy MHA caches every head
            raise GGUFFormatError(f"deepseek2: {self.key('attention.head_count_kv', self.n_head_kv)} must equal "
                                  f"{self.key('attention.head_count', self.n_head)} (legacy MHA: {self.arch}."
                                  f"attention.key_length_mla and attention.value_length_mla are not both set)")
        super().check(g)

    def check_attention(self, g, il):
        p, d = f"blk.{il}.", (self.n_embd, self.key("embedding_length", self.n_embd))
        hq = self.key("attention.head_count", self.n_head)
        r, n_rot, nope = self.kv_lora_rank, self.n_rot, self.head_dim_qk - self.n_rot
        rank = (r, self.key("attention.kv_lora_rank", r))
        kl_key, vl_key = ("key_length_mla", "value_length_mla") if self.mla else ("key_length", "value_length")
        q = (self.n_head * self.head_dim_qk, f"{hq} x {self.key('attention.' + kl_key, self.head_dim_qk)}")
        vl = self.key("attention." + vl_key, self.head_dim_v_mla)
        form = ("MLA (attention.key_length_mla is set)" if self.mla else "legacy MHA (no attention.key_length_mla)")
        if self.q_lora_rank:
            ql = (self.q_lora_rank, self.key("attention.q_lora_rank", self.q_lora_rank))
            self.expect(g, p + "attn_q_a.weight", ql, d, why=ql[1])
            self.expect(g, p + "attn_q_a_norm.weight", ql, why=ql[1])
            self.expect(g, p + "attn_q_b.weight", q, ql, why=ql[1])
        else:
            self.expect(g, p + "attn_q.weight", q, d, why=self.key("attention.q_lora_rank", 0))
        self.expect(g, p + "attn_kv_a_mqa.weight", (r + n_rot, f"{rank[1]} + {self.key('rope.dimension_count', n_rot)}"), d)
        self.expect(g, p + "attn_kv_a_norm.weight", rank)
        heads = (self.n_head, hq)
        if self.mla:
            self.expect(g, p + "attn_k_b.weight", heads, rank, (nope, f"{q[1]} - rope.dimension_count={n_rot} per head"),
                        why=form)
            self.expect(g, p + "attn_v_b.weight", heads, (self.head_dim_v_mla, vl), rank, why=form)
        else:
            self.expect(g, p + "attn_kv_b.weight", (self.n_head * (nope + self.head_dim_v_mla),
                                                    f"{hq} x ({q[1]} - rope.dimension_count={n_rot} + {vl})"),
                        rank, why=form)
        self.expect(g, p + "attn_output.weight", d, (self.n_head * self.head_dim_v_mla, f"{hq} x {vl}"))

    def check_moe(self, g, il):
        super().check_moe(g, il)
        check_shared_experts(self, g, il)
        self.expect(g, f"blk.{il}.exp_probs_b.bias", (self.n_expert, self.key("expert_count", self.n_expert)),
                    required=False)


@njit(cache=True)
def _kq_scale(attn_factor, freq_scale, log_mul, hd):  # all f32 -> f32, llama.cpp deepseek2's float steps
    lg = math.log(np.float32(1) / freq_scale)  # numba's float32 log is libm logf
    org = attn_factor * (np.float32(1) + np.float32(0.1) * lg)
    mscale = org * (np.float32(1) + np.float32(0.1) * log_mul * lg)
    return np.float32(1) * mscale * mscale / math.sqrt(hd)


def route(logits: np.ndarray, bias: np.ndarray | None, a: ModelArgs, keep: np.ndarray | None = None):
    """llama.cpp's build_moe_ffn selection for deepseek2. logits f32[n_tok, n_expert]
    -> (ids i32[n_tok, k], weights f32[n_tok, k]).

    The selection bias (exp_probs_b) and the group mask only decide which experts
    run; their weights are the unbiased gate probabilities. A group scores the sum
    of its two best biased probabilities. keep: as in base.route_topk.
    """
    k = a.n_expert_used
    if bias is None and a.n_group <= 1:
        return base.route_topk(logits, k, a.gating, a.expert_weights_norm, a.expert_weights_scale, keep)
    probs = softmax(logits) if a.gating == "softmax" else sigmoid(logits)
    sel = base.masked(probs if bias is None else probs + bias, keep)
    if a.n_group > 1:
        n_tok = sel.shape[0]
        groups = sel.reshape(n_tok, a.n_group, -1)                          # f32[n_tok, n_group, per_group]
        best2 = -np.sort(-groups, axis=-1)[..., :2]                        # f32[n_tok, n_group, 2]
        score = best2.sum(axis=-1)                                           # f32[n_tok, n_group]
        rows = np.arange(n_tok)[:, None]
        if keep is None:
            top = np.argsort(-score, axis=-1, kind="stable")[:, :a.n_group_used]
            masked = np.full_like(groups, -np.inf)
            masked[rows, top] = groups[rows, top]
        else:
            masked = np.where(_masked_groups(best2, keep, a, k)[..., None], groups, np.float32(-np.inf))
        sel = masked.reshape(n_tok, -1)
    ids = np.argsort(-sel, axis=-1, kind="stable")[:, :k].astype(np.int32)
    w = np.take_along_axis(probs, ids, axis=-1)
    if a.expert_weights_norm:
        w = w / np.maximum(w.sum(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32), np.float32(6.103515625e-5))
    if a.expert_weights_scale not in (0.0, 1.0):
        w = w * np.float32(a.expert_weights_scale)
    return ids, w.astype(np.float32)


def _masked_groups(best2: np.ndarray, keep: np.ndarray, a: ModelArgs, k: int) -> np.ndarray:
    """bool[n_tok, n_group]: the groups a masked router (localmoe.routing) picks from. A group
    scores its best two surviving experts (-inf with none); after the n_group_used best, the next
    best groups are added until they hold k survivors, so every one of the k picks is a survivor."""
    score = np.where(np.isneginf(best2[..., 0]), -np.inf, np.where(np.isneginf(best2), 0, best2).sum(-1))
    order = np.argsort(-score, axis=-1, kind="stable")                      # i64[n_tok, n_group]
    held = np.cumsum(keep.reshape(a.n_group, -1).sum(axis=1)[order], axis=1)
    n_take = np.maximum(a.n_group_used, (held < k).sum(axis=1) + 1)         # keep_arrays: k survivors exist
    chosen = np.zeros(order.shape, bool)
    np.put_along_axis(chosen, order, np.arange(order.shape[1]) < n_take[:, None], axis=1)
    return chosen


def _per_head(lin, x: np.ndarray) -> np.ndarray:
    """One token's heads each through its own matrix of lin (n_head, out, in): x f32[n_head, in]
    -> f32[n_head, out] in one kernel call (mul_mat_id's shape) instead of one Linear per head.
    llama.cpp multiplies a one-token batch of heads row by row (vec_dot), as this kernel does."""
    heads = np.arange(x.shape[0], dtype=np.int64)
    out = np.empty((1, x.shape[0], lin.n_out), np.float32)
    lin.qt.matvec_experts_into(out, lin.qt.prepare(np.ascontiguousarray(x)), (lin.rows,), heads, heads)
    return out[0]


class Block(base.Block):
    required = ("attn_norm", "attn_kv_a_mqa", "attn_kv_a_norm", "attn_output", "ffn_norm")

    def __init__(self, args: ModelArgs, w, il: int, store):
        super().__init__(args, w, il, store)
        need = ["attn_k_b", "attn_v_b"] if args.mla else ["attn_kv_b"]
        need += ["attn_q_a", "attn_q_a_norm", "attn_q_b"] if args.q_lora_rank else ["attn_q"]
        missing = [n for n in need if not hasattr(w, n)]
        if missing:
            form = ("MLA (attention.key_length_mla is set)" if args.mla
                    else "legacy MHA (no attention.key_length_mla)")
            raise GGUFFormatError(f"deepseek2 block {il}: the metadata says {form} but tensors "
                                  f"{', '.join(f'blk.{il}.{n}.weight' for n in missing)} are missing")

    def query(self, x: np.ndarray) -> np.ndarray:  # f32[n_tok, n_embd] -> f32[n_tok, n_head, head_dim_qk]
        a, w = self.args, self.w
        if a.q_lora_rank:
            q = w.attn_q_b(rms_norm(w.attn_q_a(x), w.attn_q_a_norm, a.norm_eps))
        else:
            q = w.attn_q(x)
        return q.reshape(x.shape[0], a.n_head, a.head_dim_qk)

    def attention(self, x, cache, cos, sin):
        a, w = self.args, self.w
        r, nope = a.kv_lora_rank, a.head_dim_qk - a.n_rot
        q = self.query(x)
        apply_rope(q[..., nope:], cos, sin, a.rope.neox)
        kv = w.attn_kv_a_mqa(x)                                              # f32[n_tok, r + n_rot]
        latent = rms_norm(kv[:, :r], w.attn_kv_a_norm, a.norm_eps)           # f32[n_tok, r]
        k_pe = kv[:, None, r:].copy()                                        # f32[n_tok, 1, n_rot]
        apply_rope(k_pe, cos, sin, a.rope.neox)
        if a.mla:
            o = self._latent_attention(q, latent, k_pe, cache)
        else:
            o = self._mha(q, latent, k_pe, cache)
        return w.attn_output(o)

    def _latent_attention(self, q, latent, k_pe, cache):
        """MQA over the cached latent: q_nope absorbs attn_k_b, attn_v_b decompresses per head."""
        a, w = self.args, self.w
        n_tok, r, nope = q.shape[0], a.kv_lora_rank, a.head_dim_qk - a.n_rot
        q_lat = np.empty((n_tok, a.n_head, r + a.n_rot), np.float32)       # f32[n_tok, n_head, r + n_rot]
        if n_tok == 1:
            q_lat[0, :, :r] = _per_head(w.attn_k_b, q[0, :, :nope])
        else:
            for h in range(a.n_head):
                q_lat[:, h, :r] = w.attn_k_b.stacked(h)(q[:, h, :nope])
        q_lat[:, :, r:] = q[:, :, nope:]
        k = np.concatenate([latent[:, None, :], k_pe], axis=-1)            # f32[n_tok, 1, r + n_rot]
        cache.store(self.il, k, k[..., :0])                                  # V is a view of K: none stored
        kc = cache.k[self.il]
        o = attention(q_lat, kc, kc[..., :r], cache.n_past, a.kq_scale).reshape(n_tok, a.n_head, r)
        if n_tok == 1:
            return _per_head(w.attn_v_b, o[0]).reshape(1, -1)
        out = np.empty((n_tok, a.n_head, a.head_dim_v_mla), np.float32)
        for h in range(a.n_head):
            out[:, h] = w.attn_v_b.stacked(h)(o[:, h])
        return out.reshape(n_tok, -1)

    def _mha(self, q, latent, k_pe, cache):
        """Legacy attn_kv_b files: decompress K/V for every head, cache them, plain MHA."""
        a = self.args
        n_tok, nope = q.shape[0], a.head_dim_qk - a.n_rot
        kv = self.w.attn_kv_b(latent).reshape(n_tok, a.n_head, nope + a.head_dim_v_mla)
        k = np.concatenate([kv[..., :nope], np.broadcast_to(k_pe, (n_tok, a.n_head, a.n_rot))], axis=-1)
        cache.store(self.il, k, kv[..., nope:])
        return attention(q, cache.k[self.il], cache.v[self.il], cache.n_past, a.kq_scale)

    def ffn(self, x):
        a, w = self.args, self.w
        if self.il < a.n_layer_dense_lead:
            return swiglu_ffn(x, w.ffn_gate, w.ffn_up, w.ffn_down)
        logits = self.mask_logits(base.router_logits(w.ffn_gate_inp, x))
        ids, wts = route(logits, getattr(w, "exp_probs_b", None), a, self.keep)
        out = self.run_experts(x, ids, wts)
        return out + swiglu_ffn(x, w.ffn_gate_shexp, w.ffn_up_shexp, w.ffn_down_shexp)

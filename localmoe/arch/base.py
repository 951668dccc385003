"""What every architecture shares: hyperparameters from GGUF metadata and a
pre-norm transformer block (attention + FFN). Arch files subclass both and
override only their quirks (`qk_norm`, `ffn`, routing; `check_*` for the
tensors they read). Metadata is hostile input: every key goes through the
typed readers below, and `ModelArgs.check` holds the values against the
tensor shapes before anything is sized from them."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import numpy as np
from gguf import GGMLQuantizationType

from localmoe.errors import GGUFFormatError, LocalMoEError, UnsupportedError
from localmoe.layers import (Rope, RunBuffers, apply_rope, attention, matmul_f32_sgemm, matvec_f32_vec_dot, rms_norm,
                             sigmoid, softmax)
from localmoe.moe import moe_ffn
from localmoe.routing import run_mask
from localmoe.weights import Activation, per_sequence, row_seq

INT_MAX = (1 << 31) - 1   # llama.cpp holds hyperparameters in 32-bit integers
MAX_LAYERS = 512          # llama.cpp's LLAMA_MAX_LAYERS: the longest per-layer array
_BLK = re.compile(r"^blk\.(\d+)\.")


def _kind(v) -> str:
    if isinstance(v, bool):
        return f"a boolean ({v})"
    if isinstance(v, str):
        return f"a string ({v[:40]!r})"
    if isinstance(v, list):
        return f"an array of {len(v)} values"
    return f"{'a float' if isinstance(v, float) else 'an integer'} ({v!r})"


def _get(g, key: str, n_layer: int = 0):
    """{arch}.{key}, or None. Only a per-layer key (n_layer > 0: llama.cpp's get_key_or_arr) may be
    an array, of n_layer equal values (layers that differ are not supported)."""
    full = f"{g.arch}.{key}"
    md = getattr(g, "metadata", None)
    if hasattr(md, "array_length") and full in md:
        n = md.array_length(full)  # before decoding: an array may hold 2^30 elements
        if n is not None and n != n_layer:
            raise GGUFFormatError(f"{full} must be a single value" + (f" or {n_layer} per-layer values" if n_layer else "")
                                  + f", not an array of {n} values")
    v = g.arch_get(key, None)
    if isinstance(v, list):
        if len(v) != n_layer or not n_layer:
            raise GGUFFormatError(f"{full} must be a single value, not {_kind(v)}")
        if len(set(v)) != 1:
            raise UnsupportedError(f"{full} varies per layer ({v[:8]}...); not supported")
        v = v[0]
    return v


def int_key(g, key: str, default=None, *, lo: int = 0, hi: int = INT_MAX, required=False, n_layer: int = 0):
    """{arch}.{key} as an int in lo..hi (default when absent); anything else is a GGUFFormatError."""
    v = _get(g, key, n_layer)
    if v is None:
        if required:
            raise GGUFFormatError(f"missing metadata {g.arch}.{key}")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise GGUFFormatError(f"{g.arch}.{key} must be an integer, not {_kind(v)}")
    if not lo <= v <= hi:
        raise GGUFFormatError(f"{g.arch}.{key}={v} is out of range ({lo}..{hi})")
    return v


def float_key(g, key: str, default=None, *, positive=False, nonneg=False, required=False) -> float:
    """{arch}.{key} as a finite float (> 0 if positive, >= 0 if nonneg)."""
    v = _get(g, key)
    if v is None:
        if required:
            raise GGUFFormatError(f"missing metadata {g.arch}.{key}")
        return default
    if isinstance(v, (bool, str, list)):
        raise GGUFFormatError(f"{g.arch}.{key} must be a number, not {_kind(v)}")
    f = float(v)
    if not math.isfinite(f) or (positive and f <= 0) or (nonneg and f < 0):
        raise GGUFFormatError(f"{g.arch}.{key}={v!r} must be a finite number"
                              + (" > 0" if positive else " >= 0" if nonneg else ""))
    return f


def bool_key(g, key: str, default: bool = False) -> bool:
    v = _get(g, key)
    if v is not None and not isinstance(v, bool):
        raise GGUFFormatError(f"{g.arch}.{key} must be a boolean, not {_kind(v)}")
    return default if v is None else v


def str_key(g, key: str, default: str) -> str:
    v = _get(g, key)
    if v is not None and not isinstance(v, str):
        raise GGUFFormatError(f"{g.arch}.{key} must be a string, not {_kind(v)}")
    return default if v is None else v


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    norm_eps: float
    kq_scale: float
    rope: Rope
    n_expert: int
    n_expert_used: int
    expert_weights_scale: float  # 0 or 1 = no scaling (llama.cpp)

    moe_only = True  # class attributes, not fields: llama may be dense (expert_count 0)
    ff_exp_key = "expert_feed_forward_length"  # the key giving the routed experts' width

    @classmethod
    def from_gguf(cls, g, n_expert_used: int | None = None, **extra) -> "ModelArgs":
        """Hyperparameters, each checked for type and range, then against the tensor shapes
        they imply (`check`): nothing is allocated from them, and no kernel runs, before that."""
        a = g.arch
        n_layer = int_key(g, "block_count", required=True, lo=1, hi=MAX_LAYERS)
        n_embd = int_key(g, "embedding_length", required=True, lo=1)
        n_head = int_key(g, "attention.head_count", required=True, lo=1, n_layer=n_layer)
        n_head_kv = int_key(g, "attention.head_count_kv", n_head, lo=1, n_layer=n_layer)
        hd_k = int_key(g, "attention.key_length", n_embd // n_head, lo=1)
        hd_v = int_key(g, "attention.value_length", n_embd // n_head, lo=1)
        if min(hd_k, hd_v) < 1:  # only the defaults can be 0
            raise GGUFFormatError(f"{a}.attention.head_count={n_head} exceeds {a}.embedding_length={n_embd}")
        n_ctx_train = int_key(g, "context_length", required=True, lo=1)
        n_expert = int_key(g, "expert_count", 0)
        n_used = int_key(g, "expert_used_count", 0)  # checked against n_expert in `check`
        if n_expert_used is not None:
            if not 1 <= n_expert_used <= n_expert:
                raise UnsupportedError(f"n_expert_used={n_expert_used}: this model has {n_expert} experts "
                                       f"(use 1..{n_expert})")
            n_used = int(n_expert_used)
        emb = g.tensors.get("token_embd.weight")
        if emb is None or len(emb.shape) != 2 or emb.shape[0] < 1:
            raise GGUFFormatError(f"{a}: tensor token_embd.weight is missing" if emb is None
                                  else f"{a}: tensor token_embd.weight has shape {emb.shape}, not (n_vocab, n_embd)")
        base = dict(
            arch=a, n_vocab=int(emb.shape[0]), n_embd=n_embd, n_layer=n_layer,
            n_head=n_head, n_head_kv=n_head_kv, head_dim_k=hd_k, head_dim_v=hd_v, n_ctx_train=n_ctx_train,
            norm_eps=float_key(g, "attention.layer_norm_rms_epsilon", required=True, positive=True),
            kq_scale=1.0 / math.sqrt(hd_k),  # llama.cpp ignores attention.scale for these archs
            rope=cls.rope_from_gguf(g, int_key(g, "rope.dimension_count", hd_k), n_ctx_train),
            n_expert=n_expert, n_expert_used=n_used,
            expert_weights_scale=float_key(g, "expert_weights_scale", 0.0),
        )
        names = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in {**base, **extra}.items() if k in names})
        args.check(g)
        return args

    rope_neox = False  # class attribute, not a field: set per architecture

    @classmethod
    def rope_from_gguf(cls, g, n_rot: int, n_ctx_train: int, yarn_log_mul: float = 0.0,
                       yarn_mscale: float = 1.0) -> Rope:
        """RoPE as llama.cpp's context sets it up (llama_context ctor: freq_scale, YaRN attn_factor)."""
        scaling = str_key(g, "rope.scaling.type", "linear")
        if scaling not in ("none", "linear", "yarn"):
            raise UnsupportedError(f"{g.arch}.rope.scaling.type={scaling!r} is not supported (have: none, linear, yarn)")
        factor = float_key(g, "rope.scaling.factor", 0.0, nonneg=True)
        freq_scale = 1.0 / factor if factor and scaling != "none" else 1.0
        ext = 1.0 if scaling == "yarn" else 0.0
        attn = 1.0
        if ext:
            f = 1.0 / freq_scale

            def mscale(m):
                return 1.0 if f <= 1.0 else 0.1 * m * math.log(f) + 1.0
            if f < 1.0 or (yarn_log_mul and not mscale(yarn_log_mul) > 0):
                raise GGUFFormatError(f"{g.arch}: YaRN with rope.scaling.factor={factor} (must be >= 1) and "
                                      f"rope.scaling.yarn_log_multiplier={yarn_log_mul * 0.1:g} gives no "
                                      f"valid attention factor")
            attn = mscale(yarn_mscale) / mscale(yarn_log_mul) if yarn_log_mul else mscale(1.0)
            attn /= 1.0 + 0.1 * math.log(f)  # rope_yarn multiplies this back in
        attn *= float_key(g, "rope.scaling.attn_factor", 1.0, positive=True)
        base = float_key(g, "rope.freq_base", 10000.0, positive=True)
        if ext and base == 1.0:  # YaRN's correction range divides by log(base)
            raise GGUFFormatError(f"{g.arch}.rope.freq_base=1.0 cannot be used with YaRN scaling")
        return Rope(n_rot=n_rot, neox=cls.rope_neox, freq_base=base,
                    freq_scale=freq_scale, ext_factor=ext, attn_factor=attn,
                    beta_fast=float_key(g, "rope.scaling.yarn_beta_fast", 32.0, positive=True),
                    beta_slow=float_key(g, "rope.scaling.yarn_beta_slow", 1.0, positive=True),
                    n_ctx_orig=int_key(g, "rope.scaling.original_context_length", n_ctx_train, lo=1))

    # --- the tensors these numbers imply ---------------------------------------------------------

    def key(self, name: str, value) -> str:
        return f"{self.arch}.{name}={value}"

    def expect(self, g, name: str, *dims, why: str = "", required: bool = True):
        """Tensor `name` (None if absent and not required) with one axis per dim, each (size, what
        says so) or None (any size). Errors name the tensor, the key(s) and both numbers."""
        t = g.tensors.get(name)
        if t is None:
            if required:
                raise GGUFFormatError(f"{self.arch}: tensor {name} is missing" + (f" ({why})" if why else ""))
            return None
        if len(t.shape) != len(dims):
            raise GGUFFormatError(f"{self.arch}: tensor {name} has shape {t.shape}, expected {len(dims)} "
                                  f"dimension(s)" + (f" ({why})" if why else ""))
        for i, dim in enumerate(dims):
            if dim is not None and dim[0] is not None and t.shape[i] != dim[0]:
                raise GGUFFormatError(f"{self.arch}: tensor {name} has shape {t.shape}: axis {i} is {t.shape[i]}, "
                                      f"but {dim[1]} makes it {dim[0]}")
        return t

    def width(self, g, key: str | None, tensor: str):
        """(size, what says so) of an FFN's hidden width: the key when present, else the rows of the
        first block's `tensor` (every block must then agree); (None, '') if no block has it."""
        n = None if key is None else int_key(g, key, None, lo=1,
                                             n_layer=self.n_layer if key == "feed_forward_length" else 0)
        if n is not None:
            return n, self.key(key, n)
        for il in range(self.n_layer):
            t = g.tensors.get(f"blk.{il}.{tensor}.weight")
            if t is not None and len(t.shape) >= 2:
                return int(t.shape[-2]), f"{t.name} (rows {t.shape[-2]})"
        return None, ""

    def check(self, g) -> None:
        """Every tensor the blocks read exists with the shape these hyperparameters imply, so that no
        buffer sized from them (RunBuffers, KVCache, ExpertStore, router logits) is too small for a kernel."""
        a, n = self.arch, self.n_layer
        if self.n_head % self.n_head_kv:
            raise GGUFFormatError(f"{self.key('attention.head_count', self.n_head)} is not a multiple of "
                                  f"{self.key('attention.head_count_kv', self.n_head_kv)}")
        n_rot = self.rope.n_rot
        if n_rot % 2 or not 0 < n_rot <= self.head_dim_k:
            raise GGUFFormatError(f"{self.key('rope.dimension_count', n_rot)} must be even and within "
                                  f"2..{self.head_dim_k}, the per-head key length ({a}.attention.key_length, by default "
                                  f"{a}.embedding_length / {a}.attention.head_count)")
        layers = {int(m.group(1)) for name in g.tensors if (m := _BLK.match(name))}
        beyond = [il for il in layers if il >= n]
        if beyond:
            raise GGUFFormatError(f"{self.key('block_count', n)}, but the file has tensors of block {max(beyond)} "
                                  f"(blk.{max(beyond)}.*)")
        if len(layers) < n:
            il = 0
            while il in layers:
                il += 1
            raise GGUFFormatError(f"{self.key('block_count', n)}, but the file has no tensors of block {il} "
                                  f"(blk.{il}.*): it has {len(layers)} block(s)")
        d = (self.n_embd, self.key("embedding_length", self.n_embd))
        self.expect(g, "token_embd.weight", None, d)
        self.expect(g, "output_norm.weight", d)
        self.expect(g, "output.weight", (self.n_vocab, f"token_embd.weight's {self.n_vocab} rows"), d, required=False)
        self.expect(g, "rope_freqs.weight", (n_rot // 2, f"{self.key('rope.dimension_count', n_rot)} / 2"),
                    required=False)
        for il in range(n):
            self.check_block(g, il)
        # after the tensors, so that a wrong expert_count is reported against ffn_gate_inp
        if self.moe_only and not self.n_expert:
            raise GGUFFormatError(f"{self.key('expert_count', 0)}: a {self.arch} model has experts")
        if self.n_expert and not 1 <= self.n_expert_used <= self.n_expert or not self.n_expert and self.n_expert_used:
            raise GGUFFormatError(f"{self.key('expert_used_count', self.n_expert_used)} is outside "
                                  f"1..{self.key('expert_count', self.n_expert)}")
        for name, t in g.tensors.items():  # a bias is added to its weight's output rows
            w = g.tensors.get(name[:-len(".bias")] + ".weight") if name.endswith(".bias") else None
            if w is not None and (len(w.shape) < 2 or t.shape != w.shape[:-1]):
                raise GGUFFormatError(f"{a}: tensor {name} has shape {t.shape}, but {w.name} "
                                      f"{w.shape} has {w.shape[:-1]} outputs")

    def is_moe_layer(self, il: int) -> bool:
        return self.moe_only or self.n_expert > 0

    def layer_why(self, il: int) -> str:
        """The key that makes block il a MoE or a dense layer."""
        return self.key("expert_count", self.n_expert)

    def check_block(self, g, il: int) -> None:
        p, d = f"blk.{il}.", (self.n_embd, self.key("embedding_length", self.n_embd))
        self.expect(g, p + "attn_norm.weight", d)
        self.check_attention(g, il)
        self.expect(g, p + "ffn_norm.weight", d)
        (self.check_moe if self.is_moe_layer(il) else self.check_dense)(g, il)

    def check_attention(self, g, il: int) -> None:
        p, d = f"blk.{il}.", (self.n_embd, self.key("embedding_length", self.n_embd))
        hq, hkv = self.key("attention.head_count", self.n_head), self.key("attention.head_count_kv", self.n_head_kv)
        kl, vl = self.key("attention.key_length", self.head_dim_k), self.key("attention.value_length", self.head_dim_v)
        self.expect(g, p + "attn_q.weight", (self.n_head * self.head_dim_k, f"{hq} x {kl}"), d)
        self.expect(g, p + "attn_k.weight", (self.n_head_kv * self.head_dim_k, f"{hkv} x {kl}"), d)
        self.expect(g, p + "attn_v.weight", (self.n_head_kv * self.head_dim_v, f"{hkv} x {vl}"), d)
        self.expect(g, p + "attn_output.weight", d, (self.n_head * self.head_dim_v, f"{hq} x {vl}"))

    def check_dense(self, g, il: int) -> None:
        p, d = f"blk.{il}.", (self.n_embd, self.key("embedding_length", self.n_embd))
        ff = self.width(g, "feed_forward_length", "ffn_up")
        why = f"{self.layer_why(il)}: block {il} is dense"
        self.expect(g, p + "ffn_gate.weight", ff, d, why=why)
        self.expect(g, p + "ffn_up.weight", ff, d, why=why)
        self.expect(g, p + "ffn_down.weight", d, ff, why=why)

    def check_moe(self, g, il: int) -> None:
        p, d = f"blk.{il}.", (self.n_embd, self.key("embedding_length", self.n_embd))
        e, ff = (self.n_expert, self.key("expert_count", self.n_expert)), self.width(g, self.ff_exp_key, "ffn_up_exps")
        why = f"{self.layer_why(il)}: block {il} has experts"
        self.expect(g, p + "ffn_gate_inp.weight", e, d, why=why)
        self.expect(g, p + "ffn_gate_exps.weight", e, ff, d, why=why)
        self.expect(g, p + "ffn_up_exps.weight", e, ff, d, why=why)
        self.expect(g, p + "ffn_down_exps.weight", e, d, ff, why=why)


def router_logits(gate, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """gate x f32[n_tok, n_expert] (into `out` when given) for the router weights `gate` (Linear) and
    x f32[n_tok, n_embd]. F32 weights follow llama.cpp's CPU order: ggml_vec_dot_f32 for one
    token, llamafile sgemm for a batch (when its shape allows; else vec_dot per token)."""
    if gate.qtype != GGMLQuantizationType.F32 or gate.bias is not None:
        return gate(x, out)
    n_tok = x.shape[0]
    out = np.empty((n_tok, gate.n_out), np.float32) if out is None else out
    if out.shape != (n_tok, gate.n_out) or x.shape[1] != gate.n_in:  # the kernels below do not check
        raise LocalMoEError(f"{gate.name} {gate.shape}: inputs {x.shape} / outputs {out.shape} do not fit")
    w = gate.rows.view(np.float32).reshape(gate.n_out, gate.n_in)
    x = np.ascontiguousarray(x, dtype=np.float32)

    def dot(o, xs):  # o f32[n, n_expert], xs f32[n, n_embd]
        if xs.shape[0] >= 2 and gate.n_in % 16 == 0 and gate.n_out % 4 == 0:
            matmul_f32_sgemm(o, xs, w)
        else:
            for t in range(xs.shape[0]):
                matvec_f32_vec_dot(o[t], xs[t], w)
    per_sequence(dot, out, x, row_seq(n_tok))  # see weights.ROW_SEQ
    return out


def route_topk(logits: np.ndarray, k: int, gating: str, norm: bool, scale: float, keep: np.ndarray | None = None):
    """llama.cpp's build_moe_ffn routing. logits f32[n_tok, n_expert] -> (ids i32[n_tok, k], w f32[n_tok, k]).

    gating "softmax": probabilities over all experts; "sigmoid": independent scores.
    norm: renormalise the k picked weights to sum 1; scale: multiply them (0/1 = off).
    keep: bool[n_expert], the experts that may be picked (localmoe.routing); None: all.
    """
    probs = softmax(logits) if gating == "softmax" else sigmoid(logits)
    ids = np.argsort(-masked(probs, keep), axis=-1, kind="stable")[:, :k].astype(np.int32)
    w = np.take_along_axis(probs, ids, axis=-1)
    if norm:
        # ggml_sum_rows adds in float64 (ggml_vec_sum_f32), then rounds once
        total = w.sum(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
        w = w / np.maximum(total, np.float32(6.103515625e-5))
    if scale not in (0.0, 1.0):
        w = w * np.float32(scale)
    return ids, w.astype(np.float32)


def masked(scores: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """scores f32[n_tok, n_expert] with the experts outside `keep` at -inf (a new array; scores when keep is None)."""
    return scores if keep is None else np.where(keep, scores, np.float32(-np.inf))


class Block:
    """Pre-norm block: x += attn(norm(x)); x += ffn(norm(x)). `w` holds the
    block's tensors under their GGUF names (attn_q, ffn_gate_inp, ...)."""

    required = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm")
    buf: RunBuffers | None = None  # the Model's scratch (Model sets it); None: new arrays per call
    keep: np.ndarray | None = None  # bool[n_expert]: experts the router may pick (Model.mask_experts); None: all
    min_weight = 0.0                # skip picked experts lighter than this (Model.set_min_expert_weight)

    def __init__(self, args: ModelArgs, w, il: int, store):
        self.args, self.w, self.il, self.store = args, w, il, store
        self.n_routed = self.n_run = 0  # tokens routed, (token, expert) pairs computed
        missing = [n for n in self.required if not hasattr(w, n)]
        if missing:
            raise GGUFFormatError(f"{args.arch} block {il} lacks tensor(s) {', '.join(missing)}")

    def __call__(self, x: np.ndarray, cache, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x f32[n_tok, n_embd] at positions cache.n_past..; cos/sin f32[n_tok, n_rot/2]."""
        return self.run(x, [(cache, cos, sin)])

    def run(self, x: np.ndarray, seqs) -> np.ndarray:
        """x f32[n_tok, n_embd]: the rows of each sequence of seqs [(cache, cos, sin)] in turn,
        sequence i having cos_i.shape[0] rows. Attention runs per sequence; the rest row-wise."""
        a = self.args
        xn = rms_norm(x, self.w.attn_norm, a.norm_eps)
        if len(seqs) == 1:
            h = self.attention(xn, *seqs[0])
        else:
            h, r = np.empty_like(x), 0
            for cache, cos, sin in seqs:
                n = cos.shape[0]
                h[r:r + n] = self.attention(xn[r:r + n], cache, cos, sin)
                r += n
        x = x + h
        return x + self.ffn(rms_norm(x, self.w.ffn_norm, a.norm_eps))

    def qk_norm(self, q: np.ndarray, k: np.ndarray):
        """q f32[n_tok, n_head, hd], k f32[n_tok, n_head_kv, hd]: hook for QK-norm archs."""
        return q, k

    def attention(self, x, cache, cos, sin) -> np.ndarray:
        a, w = self.args, self.w
        n_tok, buf = x.shape[0], self.buf
        x = Activation(x)  # q, k and v share x's conversion when their types do
        q = w.attn_q(x, None if buf is None else buf.q[:n_tok]).reshape(n_tok, a.n_head, a.head_dim_k)
        k = w.attn_k(x, None if buf is None else buf.k[:n_tok]).reshape(n_tok, a.n_head_kv, a.head_dim_k)
        v = w.attn_v(x, None if buf is None else buf.v[:n_tok]).reshape(n_tok, a.n_head_kv, a.head_dim_v)
        q, k = self.qk_norm(q, k)
        apply_rope(q, cos, sin, a.rope.neox)
        apply_rope(k, cos, sin, a.rope.neox)
        cache.store(self.il, k, v)
        o = attention(q, cache.k[self.il], cache.v[self.il], cache.n_past, a.kq_scale, buf)
        return w.attn_output(o)

    def ffn(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def routed_experts(self, x: np.ndarray, gating: str, norm: bool) -> np.ndarray:
        """The routed-expert sum for x f32[n_tok, n_embd], routing per `route_topk`."""
        a = self.args
        logits = router_logits(self.w.ffn_gate_inp, x, None if self.buf is None else self.buf.router[:x.shape[0]])
        ids, wts = route_topk(self.mask_logits(logits), a.n_expert_used, gating, norm, a.expert_weights_scale,
                              self.keep)
        return self.run_experts(x, ids, wts)

    def mask_logits(self, logits: np.ndarray) -> np.ndarray:
        """Router logits f32[n_tok, n_expert] with the dropped experts at -inf (in place)."""
        if self.keep is not None:
            logits[:, ~self.keep] = -np.inf
        return logits

    def run_experts(self, x: np.ndarray, ids: np.ndarray, wts: np.ndarray) -> np.ndarray:
        """moe_ffn on the router's picks, less the pairs the study levers skip (localmoe.routing):
        every architecture's routed experts go through here."""
        run = run_mask(wts, self.min_weight, self.args.expert_weights_scale)
        self.n_routed += ids.shape[0]
        self.n_run += ids.size if run is None else int(run.sum())
        return moe_ffn(self.store, self.il, x, ids, wts, run)

"""A deepseek2 model in torch whose forward pass is llama.cpp's deepseek2 graph
(src/models/deepseek2.cpp + build_moe_ffn in src/llama-graph.cpp), DeepSeek-V3 style:

    x = tok_embd[ids]
    per layer: h = rms(x)
               q = attn_q(h)  (or attn_q_b(rms(attn_q_a(h))) with a q LoRA), per head [nope | rope]
               [latent | k_pe] = attn_kv_a_mqa(h); latent = rms(latent); k_pe shared by all heads
               normal (pairwise) RoPE on q's and k_pe's rope dims; [k_nope | v] = attn_kv_b(latent) per head
               causal softmax([q_nope|q_pe] . [k_nope|k_pe] / sqrt(nope + rope)) v -> attn_output; x += attn
               h = rms(x); layers < n_lead: x += dense SwiGLU(h)
               else: s = sigmoid(router(h)); top-k of s + exp_probs_b (the bias only selects);
                     w = s_topk / sum(s_topk) * scale;  x += sum_k w_k expert_k(h) + shared(h)
    logits = output(rms(x))

llama.cpp runs MLA absorbed (q_nope through attn_k_b, attention over the
latent, attn_v_b after it); that is the same product reassociated, so this
model uses the plain per-head form, and the export splits attn_kv_b into
attn_k_b / attn_v_b (models.archs). No YaRN: trained at its full context.

Balancing is DeepSeek-V3's: `exp_probs_b` is a buffer, not a parameter; after
each optimiser step `update_bias` moves it by rate * sign(mean load - load).
The optional auxiliary loss is V3's sequence-wise one (1 when balanced).
"""
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .model import Trunk, rms_norm, swiglu


@dataclass(frozen=True)
class DSConfig:
    n_vocab: int
    n_embd: int = 256
    n_layer: int = 6
    n_head: int = 8
    q_lora: int = 0          # 0: one attn_q matrix
    kv_lora: int = 64
    nope: int = 32           # per-head q/k dims without RoPE
    rope: int = 16           # per-head q/k dims with RoPE (k's are shared across heads)
    v_dim: int = 32
    n_ff: int = 768          # the leading dense layers' FFN width
    n_lead: int = 1
    n_expert: int = 32
    n_used: int = 4
    n_shared: int = 1
    n_ff_exp: int = 128
    scale: float = 2.5       # expert_weights_scale (after normalising the k weights)
    ctx: int = 2048
    rope_base: float = 10000.0
    eps: float = 1e-6
    arch: ClassVar[str] = "deepseek2"

    def to_dict(self) -> dict:
        return asdict(self)

    def build(self) -> "DSModel":
        return DSModel(self)

    @property
    def n_moe_layers(self) -> int:
        return self.n_layer - self.n_lead

    def archs_config(self) -> dict:
        """The CONFIGS entry models.archs builds the GGUF keys and tensor layout from."""
        h = dict(n_embd=self.n_embd, n_head=self.n_head, n_ff=self.n_ff, n_ff_exp=self.n_ff_exp,
                 n_expert=self.n_expert, n_used=self.n_used, n_shared=self.n_shared, n_lead=self.n_lead,
                 n_layer=self.n_layer, q_lora=self.q_lora, kv_lora=self.kv_lora)
        return dict(tiny=h, ctx=self.ctx, rope_base=self.rope_base, eps=self.eps, groups=(1, 1),
                    scale=self.scale, norm=True, gating="sigmoid", mla=(self.nope, self.rope, self.v_dim),
                    yarn=False)


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, D]: rotate the pairs (2i, 2i + 1), as GGML_ROPE_TYPE_NORM."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


class DSBlock(nn.Module):
    def __init__(self, c: DSConfig, moe: bool):
        super().__init__()
        self.c, self.is_moe = c, moe
        d, H = c.n_embd, c.n_head
        self.attn_norm = nn.Parameter(torch.ones(d))
        if c.q_lora:
            self.attn_q_a = nn.Linear(d, c.q_lora, bias=False)
            self.attn_q_a_norm = nn.Parameter(torch.ones(c.q_lora))
            self.attn_q_b = nn.Linear(c.q_lora, H * (c.nope + c.rope), bias=False)
        else:
            self.attn_q = nn.Linear(d, H * (c.nope + c.rope), bias=False)
        self.attn_kv_a_mqa = nn.Linear(d, c.kv_lora + c.rope, bias=False)
        self.attn_kv_a_norm = nn.Parameter(torch.ones(c.kv_lora))
        self.attn_kv_b = nn.Linear(c.kv_lora, H * (c.nope + c.v_dim), bias=False)
        self.attn_output = nn.Linear(H * c.v_dim, d, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(d))
        if not moe:
            self.ffn_gate, self.ffn_up = nn.Linear(d, c.n_ff, bias=False), nn.Linear(d, c.n_ff, bias=False)
            self.ffn_down = nn.Linear(c.n_ff, d, bias=False)
            return
        E, f, fs = c.n_expert, c.n_ff_exp, c.n_ff_exp * c.n_shared
        self.ffn_gate_inp = nn.Linear(d, E, bias=False)
        self.register_buffer("exp_probs_b", torch.zeros(E))
        self.ffn_gate_exps = nn.Parameter(torch.randn(E, f, d) * d ** -0.5)
        self.ffn_up_exps = nn.Parameter(torch.randn(E, f, d) * d ** -0.5)
        self.ffn_down_exps = nn.Parameter(torch.randn(E, d, f) * f ** -0.5)
        self.ffn_gate_shexp, self.ffn_up_shexp = nn.Linear(d, fs, bias=False), nn.Linear(d, fs, bias=False)
        self.ffn_down_shexp = nn.Linear(fs, d, bias=False)

    def attention(self, x, cos, sin):
        c = self.c
        B, T, _ = x.shape
        h = rms_norm(x, self.attn_norm, c.eps)
        q = self.attn_q_b(rms_norm(self.attn_q_a(h), self.attn_q_a_norm, c.eps)) if c.q_lora else self.attn_q(h)
        q_nope, q_pe = q.view(B, T, c.n_head, -1).transpose(1, 2).split([c.nope, c.rope], dim=-1)
        latent, k_pe = self.attn_kv_a_mqa(h).split([c.kv_lora, c.rope], dim=-1)
        kv = self.attn_kv_b(rms_norm(latent, self.attn_kv_a_norm, c.eps))
        k_nope, v = kv.view(B, T, c.n_head, -1).transpose(1, 2).split([c.nope, c.v_dim], dim=-1)
        k_pe = rope_pairs(k_pe[:, None], cos, sin).expand(B, c.n_head, T, c.rope)
        q = torch.cat((q_nope, rope_pairs(q_pe, cos, sin)), dim=-1)
        k = torch.cat((k_nope, k_pe), dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=(c.nope + c.rope) ** -0.5)
        return self.attn_output(o.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x, cos, sin):
        """x [B, T, d] -> (x, sequence-wise aux loss or None, tokens per expert [n_expert] or None)."""
        x = x + self.attention(x, cos, sin)
        h = rms_norm(x, self.ffn_norm, self.c.eps)
        if not self.is_moe:
            return x + swiglu(h, self.ffn_gate.weight, self.ffn_up.weight, self.ffn_down.weight), None, None
        y, aux, load = self.moe(h)
        return x + y, aux, load

    def moe(self, h):
        """h [B, T, d] -> (out [B, T, d], aux, tokens per expert)."""
        c = self.c
        B, T, d = h.shape
        h = h.reshape(B * T, d)
        probs = torch.sigmoid(self.ffn_gate_inp(h))                           # [N, E]
        ids = (probs.detach() + self.exp_probs_b).topk(c.n_used, dim=-1).indices   # the bias only selects
        w = probs.gather(1, ids)
        w = w / w.sum(-1, keepdim=True).clamp_min(6.103515625e-5) * c.scale  # llama.cpp's clamp
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        load = torch.bincount(flat, minlength=c.n_expert)
        tok = order // c.n_used
        parts = []   # unbind once: indexing [e] per expert would add a full-size zero gradient per expert
        for xe, g, u, dn in zip(h[tok].split(load.tolist()), self.ffn_gate_exps.unbind(0),
                                self.ffn_up_exps.unbind(0), self.ffn_down_exps.unbind(0)):
            if len(xe):                                                        # rows grouped by expert
                parts.append(swiglu(xe, g, u, dn))
        y = torch.cat(parts) * w.flatten()[order, None]
        out = torch.zeros_like(h).index_add_(0, tok, y)
        out = out + swiglu(h, self.ffn_gate_shexp.weight, self.ffn_up_shexp.weight, self.ffn_down_shexp.weight)
        # DeepSeek-V3's sequence-wise balance loss: sum_e f_e P_e per sequence, f_e = E/(kT) * hits,
        # P_e = mean over the sequence of the normalised scores
        hits = F.one_hot(ids.view(B, T * c.n_used), c.n_expert).sum(1).to(h.dtype)   # [B, E]
        f = hits * c.n_expert / (c.n_used * T)
        p = (probs / probs.sum(-1, keepdim=True)).view(B, T, -1).mean(1)
        aux = (f * p).sum(-1).mean()
        return out.view(B, T, d), aux, load


class DSModel(Trunk):
    def __init__(self, c: DSConfig):
        super().__init__(c, lambda: (DSBlock(c, i >= c.n_lead) for i in range(c.n_layer)), c.rope)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: raise the under-loaded experts' bias, lower the rest."""
        for blk, l in zip((b for b in self.blocks if b.is_moe), load.to(torch.float32)):
            blk.exp_probs_b.add_(rate * torch.sign(l.mean() - l))

    def routing_bias(self) -> torch.Tensor:
        """[n_moe_layers, n_expert] selection biases."""
        return torch.stack([b.exp_probs_b for b in self.blocks if b.is_moe])

    def gguf_tensors(self) -> dict:
        """{GGUF tensor name: f32 numpy array in numpy order}; attn_kv_b is split at export (models.archs)."""
        out = {"token_embd.weight": self.token_embd.weight, "output_norm.weight": self.output_norm,
               "output.weight": self.output.weight}
        for i, blk in enumerate(self.blocks):
            for name, p in blk.named_parameters():
                out[f"blk.{i}.{name.removesuffix('.weight')}.weight"] = p
            if blk.is_moe:
                out[f"blk.{i}.exp_probs_b.bias"] = blk.exp_probs_b
        return {k: v.detach().float().cpu().numpy() for k, v in out.items()}

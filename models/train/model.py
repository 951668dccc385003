"""A qwen3moe model in torch whose forward pass is llama.cpp's qwen3moe graph
(src/models/qwen3moe.cpp + build_moe_ffn in src/llama-graph.cpp):

    x = tok_embd[ids]
    per layer: h = rms(x) -> q,k,v; q,k = per-head rms(q), rms(k) (weights q_norm, k_norm);
               neox RoPE on the whole head; causal softmax(q k^T / sqrt(head_dim)) v -> attn_output
               x += attn; g = softmax(router(rms(x))) over all experts; top-k; weights = g_topk / sum;
               x += sum_k w_k * down_k(silu(gate_k h) * up_k h)
    logits = output(rms(x))   (untied output matrix)

One RMSNorm eps everywhere, no biases, no expert weight scale. The router's
auxiliary load-balancing loss (Switch Transformer) is training-only: inference
routes exactly as above.
"""
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    n_vocab: int
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_expert: int = 8
    n_used: int = 2
    n_ff_exp: int = 512
    ctx: int = 256
    rope_base: float = 10000.0
    eps: float = 1e-6
    arch: ClassVar[str] = "qwen3moe"

    def to_dict(self) -> dict:
        return asdict(self)

    def build(self) -> "MoEModel":
        return MoEModel(self)

    @property
    def n_moe_layers(self) -> int:
        return self.n_layer

    def archs_config(self) -> dict:
        """The CONFIGS entry models.archs builds the GGUF keys and tensor layout from."""
        h = dict(n_embd=self.n_embd, n_head=self.n_head, n_head_kv=self.n_head_kv, head_dim=self.head_dim,
                 n_ff=self.n_ff_exp, n_ff_exp=self.n_ff_exp, n_expert=self.n_expert, n_used=self.n_used,
                 n_layer=self.n_layer)
        return dict(tiny=h, ctx=self.ctx, rope_base=self.rope_base, eps=self.eps)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x) with weights in nn.Linear's [out, in] layout."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]: rotate the pairs (i, i + D/2), as GGML_ROPE_TYPE_NEOX."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        d, hd = c.n_embd, c.head_dim
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.attn_q = nn.Linear(d, c.n_head * hd, bias=False)
        self.attn_k = nn.Linear(d, c.n_head_kv * hd, bias=False)
        self.attn_v = nn.Linear(d, c.n_head_kv * hd, bias=False)
        self.attn_q_norm = nn.Parameter(torch.ones(hd))
        self.attn_k_norm = nn.Parameter(torch.ones(hd))
        self.attn_output = nn.Linear(c.n_head * hd, d, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(d))
        self.ffn_gate_inp = nn.Linear(d, c.n_expert, bias=False)
        std = d ** -0.5
        self.ffn_gate_exps = nn.Parameter(torch.randn(c.n_expert, c.n_ff_exp, d) * std)
        self.ffn_up_exps = nn.Parameter(torch.randn(c.n_expert, c.n_ff_exp, d) * std)
        self.ffn_down_exps = nn.Parameter(torch.randn(c.n_expert, d, c.n_ff_exp) * c.n_ff_exp ** -0.5)

    def forward(self, x, cos, sin):
        """x [B, T, d] -> (x, aux loss, tokens per expert [n_expert])."""
        c = self.c
        B, T, _ = x.shape
        h = rms_norm(x, self.attn_norm, c.eps)
        q = self.attn_q(h).view(B, T, c.n_head, c.head_dim).transpose(1, 2)
        k = self.attn_k(h).view(B, T, c.n_head_kv, c.head_dim).transpose(1, 2)
        v = self.attn_v(h).view(B, T, c.n_head_kv, c.head_dim).transpose(1, 2)
        q = rope_neox(rms_norm(q, self.attn_q_norm, c.eps), cos, sin)
        k = rope_neox(rms_norm(k, self.attn_k_norm, c.eps), cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=c.head_dim ** -0.5,
                                           enable_gqa=c.n_head != c.n_head_kv)
        x = x + self.attn_output(o.transpose(1, 2).reshape(B, T, -1))
        moe, aux, load = self.moe(rms_norm(x, self.ffn_norm, c.eps).view(B * T, -1))
        return x + moe.view(B, T, -1), aux, load

    def moe(self, h):
        """h [N, d] -> (out [N, d], aux loss, tokens per expert)."""
        c = self.c
        probs = F.softmax(self.ffn_gate_inp(h), dim=-1)                  # [N, E]
        w, ids = probs.topk(c.n_used, dim=-1)                             # [N, k]
        w = w / w.sum(-1, keepdim=True).clamp_min(6.103515625e-5)         # llama.cpp's clamp
        out = torch.zeros_like(h)
        load = torch.bincount(ids.flatten(), minlength=c.n_expert)
        for e in range(c.n_expert):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            xe = h[tok]
            y = swiglu(xe, self.ffn_gate_exps[e], self.ffn_up_exps[e], self.ffn_down_exps[e])
            out.index_add_(0, tok, y * w[tok, slot, None])
        # Switch loss: E * sum_e (share of routed slots) * (mean router prob); 1 when balanced
        frac = load.to(h.dtype) / ids.numel()
        aux = c.n_expert * (frac * probs.mean(0)).sum()
        return out, aux, load


class Trunk(nn.Module):
    """What both trained models share: token embedding, the blocks (built by `blocks()` after the
    embedding, so initialisation draws stay in this order), final norm, untied output head and
    the RoPE tables over `rope_dim` dims. A block returns (x, aux loss, tokens per expert), with
    load None for a dense block."""

    def __init__(self, c, blocks, rope_dim: int):
        super().__init__()
        self.c = c
        self.token_embd = nn.Embedding(c.n_vocab, c.n_embd)
        nn.init.normal_(self.token_embd.weight, std=0.02)
        self.blocks = nn.ModuleList(blocks())
        self.output_norm = nn.Parameter(torch.ones(c.n_embd))
        self.output = nn.Linear(c.n_embd, c.n_vocab, bias=False)
        inv = c.rope_base ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
        ang = torch.arange(c.ctx, dtype=torch.float64)[:, None] * inv   # [ctx, rope_dim/2]
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, ids):
        """ids [B, T] -> (logits [B, T, V], mean aux loss, tokens per expert [n_moe_layers, n_expert])."""
        T = ids.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]
        x = self.token_embd(ids)
        auxes, loads = [], []
        for blk in self.blocks:
            x, aux, load = blk(x, cos, sin)
            if load is not None:
                auxes.append(aux)
                loads.append(load)
        logits = self.output(rms_norm(x, self.output_norm, self.c.eps))
        return logits, torch.stack(auxes).mean(), torch.stack(loads)


class MoEModel(Trunk):
    def __init__(self, c: Config):
        super().__init__(c, lambda: (Block(c) for _ in range(c.n_layer)), c.head_dim)

    def gguf_tensors(self) -> dict:
        """{GGUF tensor name: f32 numpy array in numpy order (= ggml ne reversed)}."""
        out = {"token_embd.weight": self.token_embd.weight, "output_norm.weight": self.output_norm,
               "output.weight": self.output.weight}
        for i, blk in enumerate(self.blocks):
            for name, p in blk.named_parameters():
                out[f"blk.{i}.{name.removesuffix('.weight')}.weight"] = p
        return {k: v.detach().float().cpu().numpy() for k, v in out.items()}

"""The GPU tier of the memory plan: what goes to VRAM under `--gpu-budget`.

The dense part goes first: every non-expert tensor except the token embedding (looked
up on the host, like llama.cpp), the fp16 KV cache, and the device scratch of one
micro-batch (`device_buffers`, the shapes the runner allocates). What is left becomes
expert slots, spread evenly over the MoE layers as in the RAM plan; which experts fill
them is the GPU tier's policy (LFU with decay, seeded by a profile). A budget below the
dense part is refused with the minimum stated. Nothing here imports CUDA.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from localmoe.errors import LocalMoEError

from .budget import format_size, parse_size
from .plan import N_UBATCH, Footprint, footprint, spread_slots

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


class GpuBudgetTooSmallError(LocalMoEError):
    """The GPU budget cannot hold the dense part of the model."""


def device_buffers(args, n_ctx: int, n_ff: int) -> dict:
    """name -> (shape, dtype) of the runner's device scratch for one micro-batch. n_ff: the widest
    FFN (routed, shared or dense; `ffn_width`)."""
    ub = min(N_UBATCH, n_ctx)
    k = max(args.n_expert_used, 1)
    n_exp = max(args.n_expert, 1)
    f4, i4 = "float32", "int32"
    bufs = {
        "x": ((ub, args.n_embd), f4), "hn": ((ub, args.n_embd), f4), "tmp": ((ub, args.n_embd), f4),
        "probs": ((ub, args.n_head, n_ctx), f4),
        "router": ((ub, n_exp), f4), "rprobs": ((ub, n_exp), f4), "rsel": ((ub, n_exp), f4),
        "gscore": ((ub, max(getattr(args, "n_group", 0), 1)), f4), "ids": ((ub, k), i4), "wts": ((ub, k), f4),
        "eg": ((ub * k, n_ff), f4), "eu": ((ub * k, n_ff), f4), "eh": ((ub * k, n_ff), f4),
        "ey": ((ub * k, args.n_embd), f4), "arange": ((ub * k,), i4), "zeros": ((ub * k,), i4),
        "sh": ((ub, args.n_embd), f4), "shg": ((ub, 1), f4),
        "logits": ((ub, args.n_vocab), f4),
    }
    r = getattr(args, "kv_lora_rank", 0)
    if not r:  # q/k/v projections, attention output
        n_q, n_kv = args.n_head * args.head_dim_k, args.n_head_kv * args.head_dim_k
        bufs.update({"q": ((ub, n_q), f4), "k": ((ub, n_kv), f4), "v": ((ub, args.n_head_kv * args.head_dim_v), f4),
                     "att": ((ub, args.n_head * args.head_dim_v), f4)})
        return bufs
    # DeepSeek-V2 MLA (localmoe.gpu.mla): q per head (nope + rope), the compressed kv (latent + roped key),
    # the q LoRA's rank; the latent form's absorbed q and latent attention output, or the legacy kv_b output
    nh, n_rot, nope = args.n_head, args.rope.n_rot, args.head_dim_qk - args.rope.n_rot
    bufs.update({"q": ((ub, nh * args.head_dim_qk), f4), "k": ((ub, r + n_rot), f4),
                 "att": ((ub, nh * args.head_dim_v_mla), f4)})
    if args.q_lora_rank:
        bufs["qa"] = ((ub, args.q_lora_rank), f4)
    if args.mla:
        bufs.update({"qlat": ((ub, nh * (r + n_rot)), f4), "alat": ((ub, nh * r), f4)})
    else:
        bufs["v"] = ((ub, nh * (nope + args.head_dim_v_mla)), f4)
    return bufs


_FFN = re.compile(r"^blk\.\d+\.ffn_(?:up|gate)(?:_exps|_shexp)?\.weight$")


def ffn_width(gguf_file, n_embd: int) -> int:
    """The widest FFN hidden layer of any block: routed experts, shared experts or a dense FFN."""
    return max([n_embd] + [int(t.shape[-2]) for n, t in gguf_file.tensors.items() if _FFN.match(n)])


def device_buffer_bytes(args, n_ctx: int, n_ff: int) -> int:
    import math
    return sum(math.prod(s) * 4 for s, _ in device_buffers(args, n_ctx, n_ff).values())


@dataclass(frozen=True)
class GpuPlan:
    budget: int
    fp: Footprint
    weight_bytes: int      # non-expert tensors on the device (all but token_embd)
    kv_bytes: int
    scratch_bytes: int     # device buffers and the RoPE tables
    slots: dict            # MoE layer -> expert slots in VRAM

    @property
    def minimum_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.scratch_bytes

    @property
    def expert_bytes(self) -> int:
        return sum(self.slots[le.layer] * le.expert_bytes for le in self.fp.layers)

    @property
    def fraction(self) -> float:
        """Share of all expert bytes in VRAM."""
        return self.expert_bytes / self.fp.all_experts_bytes if self.fp.all_experts_bytes else 1.0

    def describe(self) -> dict:
        return {"budget_bytes": self.budget, "minimum_bytes": self.minimum_bytes,
                "dense_weight_bytes": self.weight_bytes, "kv_cache_bytes": self.kv_bytes,
                "scratch_bytes": self.scratch_bytes, "expert_bytes": self.expert_bytes,
                "total_bytes": self.minimum_bytes + self.expert_bytes, "expert_fraction": self.fraction,
                "slots": {str(k): v for k, v in self.slots.items()}}


def gpu_plan(gguf_file, args, n_ctx: int, budget, fp: Footprint | None = None) -> GpuPlan:
    """budget: bytes, a size ("8G"), or "N%": the dense part plus N% of all expert bytes."""
    fp = fp or footprint(gguf_file, args, n_ctx)
    emb = gguf_file.tensors["token_embd.weight"]
    n_ff = ffn_width(gguf_file, args.n_embd)
    rope = n_ctx * args.rope.n_rot * 4  # cos and sin, f32[n_ctx, n_rot/2] each
    weights = fp.non_expert_bytes - int(emb.n_bytes)
    scratch = device_buffer_bytes(args, n_ctx, n_ff) + rope
    minimum = weights + fp.kv_bytes + scratch
    m = _PERCENT.match(str(budget)) if isinstance(budget, str) else None
    if m is not None:
        pct = float(m.group(1))
        if pct > 100:
            raise LocalMoEError(f"GPU budget {budget!r}: a share of the expert bytes must be 0..100%")
        nbytes = minimum + int(fp.all_experts_bytes * pct / 100)
    else:
        nbytes = parse_size(budget)
    if nbytes < minimum:
        raise GpuBudgetTooSmallError(
            f"GPU budget {format_size(nbytes)} is below the dense part of this model, "
            f"{format_size(minimum)} ({minimum} bytes): non-expert weights {format_size(weights)} + "
            f"KV cache {format_size(fp.kv_bytes)} (n_ctx={n_ctx}, fp16) + device buffers {format_size(scratch)}; "
            f"raise --gpu-budget or lower n_ctx")
    return GpuPlan(nbytes, fp, weights, fp.kv_bytes, scratch, spread_slots(fp, nbytes - minimum))

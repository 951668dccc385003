"""DeepSeek-V2/V3 multi-head latent attention on the device, in the two forms the CPU path
runs (localmoe.arch.deepseek2):

- latent (attn_k_b / attn_v_b): the cache holds the normed latent and the roped key, fp16
  [n_ctx, 1, kv_lora_rank + n_rot]; q_nope absorbs attn_k_b per head (one gathered matvec
  over the heads' matrices), attention is MQA over the cache with V its first kv_lora_rank
  columns, and attn_v_b decompresses each head's output (another gathered matvec);
- legacy (one attn_kv_b): K/V are decompressed per head and cached as plain MHA, the roped
  key stored in every head.

Column slices (q's nope/rope parts, the latent beside the roped key, cache columns) are
strided device views handed to the kernels, not copies. YaRN's rotation and its mscale come
with the Model's cos/sin tables and kq_scale, as on the CPU.
"""
from __future__ import annotations

import numpy as np

from . import attention as gattn
from . import ops
from .matvec import gathered_matvec


class MlaAttention:
    def __init__(self, run):
        a = run.args
        self.run = run
        ub = run.buf["x"].shape[0]
        n_slot = ub * a.n_head  # (token, head) pairs, token-major
        self.heads = run.cuda.to_device(np.tile(np.arange(a.n_head, dtype=np.int32), ub))  # i32[n_slot]: slot's head
        self.rows = run.cuda.to_device(np.arange(n_slot, dtype=np.int32))

    def __call__(self, il: int, w: dict, hn, n: int, p0: int) -> None:
        """tmp[:n] = attn_output(MLA(hn[:n])) for tokens at positions p0.."""
        run = self.run
        a, b, st = run.args, run.buf, run.st
        r, n_rot, nh = a.kv_lora_rank, a.rope.n_rot, a.n_head
        nope = a.head_dim_qk - n_rot
        if a.q_lora_rank:
            run.linear(w["attn_q_a"], b["qa"], hn, n)
            ops.rms_norm(b["qa"][:n], b["qa"][:n], w["attn_q_a_norm"], a.norm_eps, stream=st)
            run.linear(w["attn_q_b"], b["q"], b["qa"], n)
        else:
            run.linear(w["attn_q"], b["q"], hn, n)
        q3 = b["q"][:n].reshape(n, nh, a.head_dim_qk)                  # f32[n, nh, nope + n_rot]
        ops.rope(q3[:, :, nope:], run.cos, run.sin, p0, a.rope.neox, stream=st)
        run.linear(w["attn_kv_a_mqa"], b["k"], hn, n)
        kv3 = b["k"][:n].reshape(n, 1, r + n_rot)                       # f32[n, 1, r + n_rot]: latent, k_pe
        latent = kv3.reshape(n, r + n_rot)[:, :r]
        ops.rms_norm(latent, latent, w["attn_kv_a_norm"], a.norm_eps, stream=st)
        ops.rope(kv3[:, :, r:], run.cos, run.sin, p0, a.rope.neox, stream=st)
        kc, probs = run.k_cache[il], b["probs"][:n]
        if a.mla:
            g = n * nh
            heads, rows = self.heads[:g], self.rows[:g]
            ql3 = b["qlat"][:n].reshape(n, nh, r + n_rot)               # f32[n, nh, r + n_rot]
            kb, vb = w["attn_k_b"], w["attn_v_b"]
            gathered_matvec(kb.qtype, ql3.reshape(g, r + n_rot)[:, :r], q3.reshape(g, a.head_dim_qk)[:, :nope],
                            kb.w, heads, rows, r, stream=st)
            ops.copy3(ql3[:, :, r:], q3[:, :, nope:], stream=st)
            ops.kv_store(kc, kv3, p0, stream=st)                         # latent and roped key: one cache row
            alat = b["alat"][:n].reshape(n, nh, r)                       # f32[n, nh, r]
            gattn.attention(alat, probs, ql3, kc, kc[:, :, :r], p0, a.kq_scale, stream=st)
            gathered_matvec(vb.qtype, b["att"][:n].reshape(g, a.head_dim_v_mla), alat.reshape(g, r), vb.w, heads,
                            rows, a.head_dim_v_mla, stream=st)
        else:
            vc = run.v_cache[il]
            run.linear(w["attn_kv_b"], b["v"], latent, n)
            kvb = b["v"][:n].reshape(n, nh, nope + a.head_dim_v_mla)   # f32[n, nh, nope + v]
            ops.kv_store(kc[:, :, :nope], kvb[:, :, :nope], p0, stream=st)
            ops.kv_store(kc[:, :, nope:], kv3[:, :, r:], p0, stream=st)  # one roped key for every head
            ops.kv_store(vc, kvb[:, :, nope:], p0, stream=st)
            att = b["att"][:n].reshape(n, nh, a.head_dim_v_mla)
            gattn.attention(att, probs, q3, kc, vc, p0, a.kq_scale, stream=st)
        run.linear(w["attn_output"], b["tmp"], b["att"], n)

"""A Model's forward pass with the dense part in VRAM and the hot experts in VRAM slots.

Per block: RMS norm, q/k/v, QK-norm, RoPE, the fp16 KV store and attention, the output
projection, the router and its top-k, all on the device. The selected (token, expert)
pairs whose expert has a VRAM slot run there as one gathered launch per expert tensor
(mul_mat_id); the others run on the CPU kernels of the Model's ExpertStore (resident or
the RAM tier) in the same step, and the two partial sums are added on the device. The
device work is queued on the compute stream before the CPU experts run, so they overlap;
expert moves go on the tier's copy stream (tier.py). Token
embeddings are looked up on the host, as llama.cpp does.

Architectures: ARCHS (gpu/archs.py) describes each one's quirks: QK-norm, MHA or DeepSeek's
latent attention (gpu/mla.py), routing (softmax/sigmoid, renormalised, DeepSeek-V3's bias and
groups), shared experts (plain or sigmoid-gated); blocks without a router run a dense FFN
(leading dense layers). Others raise UnsupportedError.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from localmoe.errors import UnsupportedError
from localmoe.moe import swiglu_ffn
from localmoe.planner.gpu import device_buffers, ffn_width, gpu_plan
from localmoe.weights import Activation, Linear

from . import attention as gattn
from . import ops, router
from .archs import ARCHS
from .device import cuda as get_cuda
from .matvec import gathered_matvec, supported
from .mla import MlaAttention
from .tier import VramExperts


class _DevLinear:
    """A Linear's GGUF rows (and bias) on the device."""

    def __init__(self, cuda, lin: Linear):
        if not supported(lin.qtype):
            raise UnsupportedError(f"{lin.name}: no CUDA kernel for {lin.qtype.name} weights")
        self.qtype, self.n_out = lin.qtype, lin.n_out
        self.w = cuda.to_device(np.ascontiguousarray(lin.rows.reshape(-1, lin.rows.shape[-1])))
        self.bias = None if lin.bias is None else cuda.to_device(np.ascontiguousarray(lin.bias, np.float32))


class GpuRunner:
    def __init__(self, model, gpu_budget, policy: str = "lfu", profile=None):
        """model: a localmoe.model.Model built for the CPU (its ExpertStore runs the cold experts).
        gpu_budget: bytes, size text or "N%" of expert bytes (None: every expert)."""
        a = model.args
        if a.arch not in ARCHS:
            raise UnsupportedError(f"--device cuda runs {', '.join(ARCHS)} models; {a.arch} is not supported yet")
        self.arch = ARCHS[a.arch]
        self.cuda = cuda = get_cuda()
        self.model = model
        self.plan = gpu_plan(model.file, a, model.n_ctx, "100%" if gpu_budget is None else gpu_budget)
        self.buf = {name: cuda.device_array(shape, dtype) for name, (shape, dtype) in
                    device_buffers(a, model.n_ctx, ffn_width(model.file, a.n_embd)).items()}
        self.buf["arange"].copy_to_device(np.arange(self.buf["arange"].shape[0], dtype=np.int32))
        self.buf["zeros"].copy_to_device(np.zeros(self.buf["zeros"].shape[0], np.int32))
        self.no_weight = cuda.device_array(0, np.float32)
        self.layers = [self._upload_block(blk) for blk in model.blocks]
        self.output_norm = cuda.to_device(np.ascontiguousarray(model.output_norm, np.float32))
        self.output = _DevLinear(cuda, model.output)
        self.cos, self.sin = cuda.to_device(model.cos), cuda.to_device(model.sin)
        shape_k = (model.n_ctx, a.n_head_kv, a.head_dim_k)
        shape_v = (model.n_ctx, a.n_head_kv, a.head_dim_v)
        self.k_cache = [cuda.device_array(shape_k, np.float16) for _ in range(a.n_layer)]
        self.v_cache = [cuda.device_array(shape_v, np.float16) if a.head_dim_v else None  # MLA: V is K's view
                        for _ in range(a.n_layer)]
        self.attention = MlaAttention(self) if self.arch.attention == "mla" else self._attention
        for key, dev in self._expert_stacks(model).items():
            if not supported(dev.qtype):
                raise UnsupportedError(f"{dev.name}: no CUDA kernel for {dev.qtype.name} experts")
        self.st = cuda.stream()  # compute; the tier moves experts on a stream of its own
        self.experts = VramExperts(cuda, model.file, self.plan, policy, profile)
        self.qtypes = {key[1]: lin.qtype for key, lin in self._expert_stacks(model).items()}
        self.pairs = {"gpu": 0, "cpu": 0}  # (token, expert) selections run on each side

    @property
    def args(self):  # the Model's, which set_expert_used replaces
        return self.model.args

    @staticmethod
    def _expert_stacks(model) -> dict:
        return {(blk.il, n): lin for blk in model.blocks for n, lin in vars(blk.w).items()
                if n.endswith("_exps") and isinstance(lin, Linear)}

    def _upload_block(self, blk) -> dict:
        cuda, d = self.cuda, {}
        for name, v in vars(blk.w).items():
            if name.endswith("_exps"):
                continue
            if isinstance(v, Linear):
                d[name] = _DevLinear(cuda, v)
            elif isinstance(v, np.ndarray):
                d[name] = cuda.to_device(np.ascontiguousarray(v, np.float32))
        if "ffn_gate_exps" not in vars(blk.w) and "ffn_up_exps" in vars(blk.w):
            raise UnsupportedError("--device cuda: experts without a gate tensor are not supported yet")
        need = {"plain": ("ffn_up_shexp",), "gated": ("ffn_up_shexp", "ffn_gate_inp_shexp")}.get(self.arch.shared, ())
        if "ffn_gate_inp" in d and any(n not in d for n in need):  # the arch's ModelArgs.check requires them
            raise UnsupportedError(f"--device cuda: block {blk.il} lacks its shared expert ({', '.join(need)})")
        return d

    # --- forward ---------------------------------------------------------------

    def linear(self, lin: _DevLinear, out, x, n: int) -> None:
        """out[:n] = lin(x[:n]) on the device: one slot per token on matrix 0."""
        b = self.buf
        gathered_matvec(lin.qtype, out[:n], x[:n], lin.w, b["zeros"][:n], b["arange"][:n], lin.n_out, stream=self.st)
        if lin.bias is not None:
            ops.add_bias(out[:n], lin.bias, stream=self.st)

    def forward(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        """Logits as Model.forward, for ids already checked; advances the Model's cache."""
        m, out = self.model, []
        ub = self.buf["x"].shape[0]
        for s in range(0, ids.size, ub):
            n = min(ub, ids.size - s)
            self._hidden(ids[s:s + n])
            if all_logits or s + ub >= ids.size:
                first = 0 if all_logits else n - 1
                out.append(self._logits(first, n))
            m.cache.advance(n)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _logits(self, first: int, n: int) -> np.ndarray:
        b, eps = self.buf, self.args.norm_eps
        ops.rms_norm(b["hn"][first:n], b["x"][first:n], self.output_norm, eps, stream=self.st)
        self.linear(self.output, b["logits"], b["hn"][first:n], n - first)
        return b["logits"][:n - first].copy_to_host(stream=self.st)

    def _hidden(self, ids: np.ndarray) -> None:
        m, a, b = self.model, self.args, self.buf
        n, p0 = ids.size, m.cache.n_past
        b["x"][:n].copy_to_device(m.token_embd.get_rows(ids), stream=self.st)
        for blk, w in zip(m.blocks, self.layers):
            x, hn, tmp = b["x"][:n], b["hn"][:n], b["tmp"][:n]
            ops.rms_norm(hn, x, w["attn_norm"], a.norm_eps, stream=self.st)
            self.attention(blk.il, w, hn, n, p0)
            ops.add(x, x, tmp, stream=self.st)
            ops.rms_norm(hn, x, w["ffn_norm"], a.norm_eps, stream=self.st)
            if "ffn_gate_inp" in w:
                self._moe(blk, w, n)
            else:
                self._ffn(w, "", b["tmp"], n)
            ops.add(x, x, tmp, stream=self.st)

    def _attention(self, il: int, w: dict, hn, n: int, p0: int) -> None:
        a, b = self.args, self.buf
        q, k, v = b["q"][:n], b["k"][:n], b["v"][:n]
        self.linear(w["attn_q"], b["q"], hn, n)
        self.linear(w["attn_k"], b["k"], hn, n)
        self.linear(w["attn_v"], b["v"], hn, n)
        if self.arch.qk_norm == "head":
            ops.rms_norm(q.reshape(n * a.n_head, a.head_dim_k), q.reshape(n * a.n_head, a.head_dim_k),
                         w["attn_q_norm"], a.norm_eps, stream=self.st)
            ops.rms_norm(k.reshape(n * a.n_head_kv, a.head_dim_k), k.reshape(n * a.n_head_kv, a.head_dim_k),
                         w["attn_k_norm"], a.norm_eps, stream=self.st)
        elif self.arch.qk_norm == "full":
            ops.rms_norm(q, q, w["attn_q_norm"], a.norm_eps, stream=self.st)
            ops.rms_norm(k, k, w["attn_k_norm"], a.norm_eps, stream=self.st)
        q3, k3 = q.reshape(n, a.n_head, a.head_dim_k), k.reshape(n, a.n_head_kv, a.head_dim_k)
        ops.rope(q3, self.cos, self.sin, p0, a.rope.neox, stream=self.st)
        ops.rope(k3, self.cos, self.sin, p0, a.rope.neox, stream=self.st)
        ops.kv_store(self.k_cache[il], k3, p0, stream=self.st)
        ops.kv_store(self.v_cache[il], v.reshape(n, a.n_head_kv, a.head_dim_v), p0, stream=self.st)
        att = b["att"][:n].reshape(n, a.n_head, a.head_dim_v)
        gattn.attention(att, b["probs"][:n], q3, self.k_cache[il], self.v_cache[il], p0, a.kq_scale, stream=self.st)
        self.linear(w["attn_output"], b["tmp"], b["att"], n)

    def _ffn(self, w: dict, suffix: str, out, n: int) -> None:
        """out[:n] = down(silu(gate hn) * up hn) for the block's dense FFN (suffix "") or shared experts ("_shexp")."""
        b = self.buf
        eg, eu, eh = (self.rows(name, n, w["ffn_up" + suffix].n_out) for name in ("eg", "eu", "eh"))
        self.linear(w["ffn_gate" + suffix], eg, b["hn"], n)
        self.linear(w["ffn_up" + suffix], eu, b["hn"], n)
        ops.swiglu(eh, eg, eu, stream=self.st)
        self.linear(w["ffn_down" + suffix], out, eh, n)

    def rows(self, name: str, n: int, width: int):
        """A contiguous f32[n, width] over the start of buffer `name` (sized for the widest FFN): the
        kernels take the row length from their input's shape."""
        return self.buf[name].reshape(-1)[:n * width].reshape(n, width)

    def _moe(self, blk, w: dict, n: int) -> None:
        """tmp[:n] = the routed experts' sum: VRAM experts on the device, the rest on the CPU."""
        m, a, b, il = self.model, self.args, self.buf, blk.il
        self.linear(w["ffn_gate_inp"], b["router"], b["hn"], n)
        k = a.n_expert_used
        if k > b["ids"].shape[1]:
            raise UnsupportedError(f"--device cuda: {k} experts per token is more than the {b['ids'].shape[1]} "
                                   f"the device buffers were sized for; load with n_expert_used={k}")
        ids_d, wts_d = b["ids"][:n, :k], b["wts"][:n, :k]
        if k != b["ids"].shape[1]:  # set_expert_used lowered k: contiguous views of the first n*k entries
            ids_d = b["ids"].reshape(-1)[:n * k].reshape(n, k)
            wts_d = b["wts"].reshape(-1)[:n * k].reshape(n, k)
        gating, norm = self.arch.routing(a)
        groups = a.n_group_used if getattr(a, "n_group", 0) > 1 else 0
        router.route(ids_d, wts_d, (b["rprobs"][:n], b["rsel"][:n], b["gscore"][:n]), b["router"][:n],
                     w.get("exp_probs_b", self.no_weight), gating, norm, a.expert_weights_scale, groups, stream=self.st)
        ids, wts = ids_d.copy_to_host(stream=self.st), wts_d.copy_to_host(stream=self.st)
        self.st.synchronize()
        m.store.note_selected(il, ids)
        self.experts.ready(il, self.st)
        self.experts.fill_free(il, ids)
        slot = self.experts.resident(il)[ids]  # i32[n, k]: VRAM slot or -1
        cpu = slot < 0
        h = b["hn"][:n].copy_to_host(stream=self.st) if cpu.any() else None  # before the expert kernels queue
        tmp = b["tmp"][:n]
        ops.fill(tmp, 0.0, stream=self.st)
        tok, j = np.nonzero(~cpu)  # token-major, slot order within a token
        self.pairs["gpu"] += tok.size
        self.pairs["cpu"] += slot.size - tok.size
        if tok.size:
            self._vram_experts(il, n, tok, slot[tok, j], wts[tok, j])
        if self.arch.shared:  # queued before the CPU experts, added after them (the CPU path's order)
            self._ffn(w, "_shexp", b["sh"], n)
            if self.arch.shared == "gated":
                self.linear(w["ffn_gate_inp_shexp"], b["shg"], b["hn"], n)
        if h is not None:  # the CPU experts run while the device works on its own
            part = self._cpu_experts(il, h, ids, wts, cpu)
            ops.add(tmp, tmp, self.cuda.to_device(part, stream=self.st), stream=self.st)
        if self.arch.shared == "gated":
            ops.add_gated(tmp, b["sh"][:n], b["shg"][:n], stream=self.st)
        elif self.arch.shared:
            ops.add(tmp, tmp, b["sh"][:n], stream=self.st)
        self.experts.update(il, ids, self.st)

    def _vram_experts(self, il: int, n: int, tok, slots, wts) -> None:
        """The (token, expert) pairs tok/slots (token-major) on the device, sorted by expert for the
        matmuls (a batch then decodes each weight unit once per tile of pairs), summed per token."""
        b, g = self.buf, tok.size

        def to_dev(arr):
            return self.cuda.to_device(arr, stream=self.st)
        order = np.argsort(slots, kind="stable")
        perm = np.empty(g, np.int32)
        perm[order] = np.arange(g, dtype=np.int32)  # row of pair p in the sorted outputs
        sid, xrow = to_dev(slots[order].astype(np.int32)), to_dev(tok[order].astype(np.int32))
        start = to_dev(np.searchsorted(tok, np.arange(n + 1)).astype(np.int32))
        stack, q, st = self.experts.stack, self.qtypes, self.st
        n_ff = self.experts.rows[il, "ffn_up_exps"]
        eg, eu, eh = (self.rows(name, g, n_ff) for name in ("eg", "eu", "eh"))
        gathered_matvec(q["ffn_gate_exps"], eg, b["hn"][:n], stack(il, "ffn_gate_exps"), sid, xrow, n_ff,
                        stream=st)
        gathered_matvec(q["ffn_up_exps"], eu, b["hn"][:n], stack(il, "ffn_up_exps"), sid, xrow, n_ff,
                        stream=st)
        ops.swiglu(eh, eg, eu, stream=self.st)
        gathered_matvec(q["ffn_down_exps"], b["ey"][:g], eh, stack(il, "ffn_down_exps"), sid,
                        b["arange"][:g], self.args.n_embd, stream=self.st)
        ops.weighted_sum(b["tmp"][:n], b["ey"][:g], to_dev(perm), start, to_dev(wts.astype(np.float32)), stream=self.st)

    def _cpu_experts(self, il: int, h: np.ndarray, ids, wts, cpu) -> np.ndarray:
        """f32[n, n_embd]: the sum of the CPU-side selections (cpu: bool[n, k]) with the CPU kernels."""
        store = self.model.store
        out = np.zeros((h.shape[0], h.shape[1]), np.float32)
        ha = Activation(h)
        for e in np.unique(ids[cpu]):
            tok, s = np.nonzero((ids == e) & cpu)
            y = swiglu_ffn(ha.take_rows(tok), store.expert(il, "ffn_gate_exps", e), store.expert(il, "ffn_up_exps", e),
                           store.expert(il, "ffn_down_exps", e))
            np.add.at(out, tok, y * wts[tok, s, None])
        return out

    def stats(self) -> dict:
        return {"gpu_expert_moves": self.experts.moves, "gpu_pairs": self.pairs["gpu"],
                "cpu_pairs": self.pairs["cpu"], "gpu_plan": self.plan.describe()}

    def close(self) -> None:
        self.buf, self.layers, self.k_cache, self.v_cache, self.experts = {}, [], [], [], None

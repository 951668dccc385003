"""Wire the planner into a Model: resident copies of the non-expert tensors,
an OffloadedExpertStore for the experts, routers for the prefetcher."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from localmoe.weights import load_tensors

from .budget import parse_size
from .disk import DiskReader
from .plan import _EXPS, plan_for
from .prefetch import Router
from .stats import load_profile
from .store import OffloadedExpertStore


@dataclass(frozen=True)
class _Copied:
    name: str
    qtype: object
    shape: tuple
    data: np.ndarray


class _ResidentSource:
    """What load_tensors reads: non-expert tensors as private copies (anonymous
    memory), expert stacks as the untouched mmap views (only their shapes are used)."""

    def __init__(self, gguf_file, reader: DiskReader):
        self._gf = gguf_file
        self.tensors = {n: t if _EXPS.match(n) else _Copied(n, t.qtype, t.shape, reader.copy(t.offset, t.n_bytes))
                        for n, t in gguf_file.tensors.items()}

    def arch_get(self, *a):
        return self._gf.arch_get(*a)


def prefer_passive_omp() -> None:
    """Let OpenMP workers sleep instead of spin between kernels. Spinning workers, while the main
    thread waits on a read, hold a core and then get descheduled, and every kernel waits for them:
    1.65 vs 0.34 s/token on a busy 2-core machine. OpenMP reads this once, when numba starts its
    pool (first parallel kernel or numba.set_num_threads), so call it before either."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def offload(gguf_file, args, n_ctx: int, ram_budget, policy: str = "lfu", expert_profile=None,
            prefetch: bool = True, n_seq: int = 1):
    """-> (plan, top tensors, block tensors, store). Raises BudgetTooSmallError before reading anything.
    n_seq: KV caches the budget must hold (Model.new_cache's, for a server's slots)."""
    plan = plan_for(gguf_file, args, n_ctx, parse_size(ram_budget), n_seq)
    profile = None if expert_profile is None else load_profile(expert_profile, args.n_layer, args.n_expert)
    reader = DiskReader(gguf_file.path)
    try:
        top, blocks = load_tensors(_ResidentSource(gguf_file, reader))
        routers = {le.layer: Router(blocks[le.layer].ffn_norm, blocks[le.layer].ffn_gate_inp,
                                    getattr(blocks[le.layer], "exp_probs_b", None), args.norm_eps)
                   for le in plan.fp.layers if hasattr(blocks[le.layer], "ffn_gate_inp")}
        store = OffloadedExpertStore.from_blocks(blocks, args.n_expert, plan=plan, reader=reader, policy=policy,
                                                 routers=routers, profile=profile, prefetch=prefetch)
    except BaseException:
        reader.close()
        raise
    return plan, top, blocks, store

"""Model: load a GGUF MoE model and run it (eval, generate) on the CPU."""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from localmoe.arch import arch_module
from localmoe.errors import LocalMoEError, UnsupportedError
from localmoe.experts import ExpertStore
from localmoe.kv_cache import KVCache
from localmoe.layers import RunBuffers, rms_norm
from localmoe.model_lock import ModelLock, hold_while_iterating
from localmoe.routing import check_min_weight, keep_arrays, least_used
from localmoe.weights import ROW_SEQ, load_tensors

DEFAULT_MAX_CTX = 4096
N_UBATCH = 512  # tokens per forward pass through the blocks


@dataclass
class Timings:
    """Seconds spent in the last generate_tokens call: the prompt batch, then one-token steps."""

    n_prompt: int = 0
    t_prompt: float = 0.0
    n_decode: int = 0
    t_decode: float = 0.0
    stop: str = ""  # why it ended: "end" (end-of-generation), "length", "context" (full), "stop" (string)


class ContextLengthWarning(UserWarning):
    """n_ctx is larger than the context the model was trained with."""


def context_bytes(args, n_ctx: int) -> dict:
    """Memory a context of n_ctx tokens takes: the fp16 KV cache (KVCache), the run buffers
    (RunBuffers, as the planner counts them) and the RoPE tables."""
    kv = args.n_layer * n_ctx * args.n_head_kv * (args.head_dim_k + args.head_dim_v) * 2
    run = RunBuffers.nbytes(args, n_ctx, min(N_UBATCH, n_ctx)) + 2 * n_ctx * (args.rope.n_rot // 2) * 4
    return {"kv": kv, "run": run, "total": kv + run}


def available_memory() -> int | None:
    """Bytes the kernel can give without swapping (MemAvailable), else free pages; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_context(args, n_ctx: int, available: int | None = None) -> None:
    """Refuse a context the machine cannot hold (before anything is allocated); warn past
    the training context."""
    need = context_bytes(args, n_ctx)
    avail = available_memory() if available is None else available
    if avail is not None and need["total"] > avail:
        raise LocalMoEError(
            f"a context of {n_ctx} tokens needs {_gib(need['total'])} of memory (KV cache "
            f"{_gib(need['kv'])}, run buffers {_gib(need['run'])}), but {_gib(avail)} is available: "
            f"use a smaller context (--ctx / n_ctx)")
    if n_ctx > args.n_ctx_train:
        warnings.warn(f"n_ctx={n_ctx} is larger than the model's training context ({args.n_ctx_train}): "
                      f"output past {args.n_ctx_train} tokens may degrade", ContextLengthWarning, stacklevel=4)


class Model:
    def __init__(self, gguf_file, n_ctx: int | None = None, n_expert_used: int | None = None,
                 ram_budget=None, policy: str | None = None, expert_profile=None, prefetch: bool = True,
                 gpu_budget=None, device: str | None = None, n_seq: int = 1):
        """ram_budget (bytes or "6G"): hold experts in a budgeted cache and stream the rest
        from disk (localmoe.planner; policy "lru"/"lfu", expert_profile: saved --stats-out JSON,
        prefetch: guess the next layer's experts and read them on a background thread).
        device "cpu" / "cuda" / "auto" (None: cuda when gpu_budget is given); gpu_budget (bytes,
        "8G" or "N%" of expert bytes; None: all): the dense part and hot experts in VRAM (localmoe.gpu).
        n_seq: KV caches the RAM budget holds, the model's own and n_seq - 1 from new_cache()."""
        if isinstance(n_seq, bool) or not isinstance(n_seq, (int, np.integer)) or n_seq < 1:
            raise LocalMoEError(f"n_seq must be an integer >= 1, got {n_seq!r}")
        self.file = gguf_file
        mod = arch_module(gguf_file.arch)
        self.args = a = mod.ModelArgs.from_gguf(gguf_file, n_expert_used)
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer))):
            raise LocalMoEError(f"n_ctx must be an integer, got {n_ctx!r}")
        self.n_ctx = int(min(a.n_ctx_train, DEFAULT_MAX_CTX) if n_ctx is None else n_ctx)
        if self.n_ctx < 1:
            raise LocalMoEError(f"n_ctx must be >= 1, got {n_ctx}")
        check_context(a, self.n_ctx)
        self._lock = ModelLock()
        self.cache_user = None  # who last changed the KV cache: None after any Model call (ChatSession marks its turns)
        self.plan = None
        gpu = device not in (None, "cpu") or gpu_budget is not None
        if ram_budget is None:
            if (not gpu and (policy is not None or expert_profile is not None)) or not prefetch:
                raise LocalMoEError("cache policy, expert profile and prefetch options need a RAM budget "
                                    "(ram_budget=... / --ram-budget)")
            top, blocks = load_tensors(gguf_file)
            self.store = ExpertStore.from_blocks(blocks, a.n_expert)
        else:
            from localmoe.planner import DEFAULT_POLICY, offload
            self.plan, top, blocks, self.store = offload(gguf_file, a, self.n_ctx, ram_budget,
                                                         policy or DEFAULT_POLICY, expert_profile, prefetch, n_seq)
        self.token_embd = top.token_embd
        self.output_norm = top.output_norm
        self.output = getattr(top, "output", top.token_embd)  # tied embeddings when absent
        self.blocks = [mod.Block(a, w, il, self.store) for il, w in enumerate(blocks)]
        self.cache = KVCache(a.n_layer, self.n_ctx, a.n_head_kv, a.head_dim_k, a.head_dim_v)
        self.buffers = RunBuffers.allocate(a, self.n_ctx, min(N_UBATCH, self.n_ctx))
        for blk in self.blocks:
            blk.buf = self.buffers
        self.cos, self.sin = a.rope.tables(self.n_ctx,
                                           getattr(top, "rope_freqs", None))  # f32[n_ctx, n_rot/2] each
        self._tokenizer = None
        self.timings = Timings()
        self.closed = False
        self.gpu = None  # localmoe.gpu.runner.GpuRunner when the CUDA device runs the model
        if gpu:
            self._start_gpu(device, gpu_budget, policy, expert_profile)

    def _start_gpu(self, device, gpu_budget, policy, expert_profile) -> None:
        try:
            from localmoe.gpu.device import resolve_device
            if resolve_device(device, gpu_budget) != "cuda":
                return
            from localmoe.gpu.runner import GpuRunner
            from localmoe.planner import DEFAULT_POLICY, load_profile
            profile = None if expert_profile is None else load_profile(expert_profile, self.args.n_layer,
                                                                       self.args.n_expert)
            self.gpu = GpuRunner(self, gpu_budget, policy or DEFAULT_POLICY, profile)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release what the model holds outside Python's heap: the expert store's prefetch
        thread and file descriptor, and the file mapping. Idempotent; forward afterwards raises."""
        if self.closed:
            return
        self._lock.wait_idle()  # not while a forward of another thread reads the mapping
        self.closed = True
        if self.gpu is not None:
            self.gpu.close()
        self.store.close()
        self.file.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_vocab(self) -> int:
        return self.args.n_vocab

    # --- running -------------------------------------------------------------

    def forward(self, tokens: Sequence[int], all_logits: bool = True) -> np.ndarray:
        """Append tokens to the cache. Logits f32[n_tok, n_vocab] for each of them, or
        f32[1, n_vocab] for the last one only. Runs in micro-batches of N_UBATCH tokens
        (like llama.cpp's n_ubatch) so attention scratch stays bounded for long prompts.
        Calls from several threads are serialised (see Model.generate_tokens)."""
        ids = self._token_ids(tokens)
        with self._lock.held():
            if self.closed:
                raise LocalMoEError("the model is closed")
            self.cache_user = None
            self.cache.check_room(ids.size)
            return self._forward(ids, all_logits)

    def _token_ids(self, tokens) -> np.ndarray:
        """tokens as i64[n], or LocalMoEError for a non-integer or out-of-vocabulary id."""
        try:
            raw = np.asarray(tokens).reshape(-1)
        except (ValueError, TypeError) as e:
            raise LocalMoEError(f"token ids must be a flat sequence of integers: {e}") from None
        if raw.size == 0:
            raise LocalMoEError("no tokens to evaluate")
        kind = raw.dtype.kind  # "O": Python ints past 64 bits, or mixed objects
        if kind not in "iuO" or (kind == "O" and not all(isinstance(t, (int, np.integer)) for t in raw)) or \
                (kind == "O" and any(isinstance(t, bool) for t in raw)):
            bad = next(t for t in raw.tolist() if isinstance(t, bool) or not isinstance(t, (int, np.integer)))
            raise LocalMoEError(f"token ids must be integers, got {bad!r}")
        outside = (raw < 0) | (raw >= self.n_vocab)
        if outside.any():  # int(): exact for uint64 and Python ints alike
            raise LocalMoEError(f"token id {int(raw[outside][0])} is outside the vocabulary (0..{self.n_vocab - 1})")
        return raw.astype(np.int64)

    def _forward(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        if self.gpu is not None:
            return self.gpu.forward(ids, all_logits)
        out = []
        for s in range(0, ids.size, N_UBATCH):
            h = self._hidden(ids[s:s + N_UBATCH])
            if all_logits or s + N_UBATCH >= ids.size:
                h = h if all_logits else h[-1:]
                out.append(self.output(rms_norm(h, self.output_norm, self.args.norm_eps)))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _hidden(self, ids: np.ndarray) -> np.ndarray:
        """Run the blocks over ids at the next cache positions -> f32[n_tok, n_embd]."""
        return self._hidden_seqs([(self.cache, ids)])

    def _hidden_seqs(self, seqs) -> np.ndarray:
        """seqs [(KVCache, i64[n_i])]: each sequence's ids at its cache's next positions, as one
        batch of sum(n_i) rows -> f32[sum(n_i), n_embd]. Only attention looks across rows, and it
        runs per sequence; every other op is row-wise, so a sequence's rows do not depend on
        what else is in the batch."""
        parts = [(c, self.cos[c.n_past:c.n_past + i.size], self.sin[c.n_past:c.n_past + i.size]) for c, i in seqs]
        x = self.token_embd.get_rows(np.concatenate([i for _, i in seqs]) if len(seqs) > 1 else seqs[0][1])
        seq = np.repeat(np.arange(len(seqs), dtype=np.int32), [i.size for _, i in seqs]) if len(seqs) > 1 else None
        token = ROW_SEQ.set(seq)
        try:
            for blk in self.blocks:
                self.store.before_block(blk.il, x)
                x = blk.run(x, parts)
        finally:
            ROW_SEQ.reset(token)
        for c, i in seqs:
            c.advance(i.size)
        return x

    def new_cache(self) -> KVCache:
        """An empty KV cache shaped like the model's own, for forward_seqs. Its pages are
        committed as positions fill (np.zeros), so an unused one costs address space only."""
        a = self.args
        return KVCache(a.n_layer, self.n_ctx, a.n_head_kv, a.head_dim_k, a.head_dim_v)

    def forward_seqs(self, seqs) -> np.ndarray:
        """Several sequences in one pass: seqs [(KVCache, token ids)], each cache from
        new_cache() (or the model's own); at most N_UBATCH tokens in all. Appends each
        sequence's tokens to its cache and returns the logits of each one's last token,
        f32[len(seqs), n_vocab]. A sequence's logits are those forward would give it alone."""
        parts = [(c, self._token_ids(t)) for c, t in seqs]
        n = sum(i.size for _, i in parts)
        if not parts or n > N_UBATCH:
            raise LocalMoEError(f"forward_seqs takes 1..{N_UBATCH} tokens in all, got {n}")
        if len({id(c) for c, _ in parts}) != len(parts):
            raise LocalMoEError("forward_seqs: each sequence needs a KV cache of its own")
        with self._lock.held():
            if self.closed:
                raise LocalMoEError("the model is closed")
            for c, i in parts:
                if c.k.shape != self.cache.k.shape or c.v.shape != self.cache.v.shape:
                    raise LocalMoEError("forward_seqs: a KV cache not shaped for this model (use new_cache())")
                c.check_room(i.size)
            self.cache_user = None
            if self.gpu is not None:
                if len(parts) > 1 or parts[0][0] is not self.cache:
                    raise UnsupportedError("--device cuda runs one sequence, in the model's own cache")
                return self.gpu.forward(parts[0][1], False)[-1:]
            last = np.cumsum([i.size for _, i in parts]) - 1
            h = self._hidden_seqs(parts)[last]
            token = ROW_SEQ.set(np.arange(len(parts), dtype=np.int32))  # one row each, as alone
            try:
                return self.output(rms_norm(h, self.output_norm, self.args.norm_eps))
            finally:
                ROW_SEQ.reset(token)

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits f32[len(tokens), n_vocab] for every position, from an empty cache, batched."""
        with self._lock.held():
            self.reset()
            return self.forward(tokens)

    def reset(self) -> None:
        with self._lock.held():
            self.cache_user = None
            self.cache.reset()

    def set_expert_used(self, k: int) -> None:
        """Change the active experts per token without reloading (as load(n_expert_used=k));
        resets the cache, whose entries were computed with the old count."""
        if not 1 <= k <= self.args.n_expert:
            raise UnsupportedError(f"n_expert_used={k}: this model has {self.args.n_expert} experts "
                                   f"(use 1..{self.args.n_expert})")
        fewest = min(((int(b.keep.sum()), b.il) for b in self.blocks if b.keep is not None), default=None)
        if fewest is not None and fewest[0] < k:
            raise LocalMoEError(f"n_expert_used={k}: the expert mask keeps {fewest[0]} expert(s) in layer "
                                f"{fewest[1]}; lift it first (mask_experts(None))")
        with self._lock.held():
            self.args = replace(self.args, n_expert_used=int(k))
            for blk in self.blocks:
                blk.args = self.args
            self.reset()

    # --- the study levers (localmoe.routing) ---------------------------------------------

    def _moe_layers(self) -> list[int]:
        return [b.il for b in self.blocks if self.args.n_expert and self.args.is_moe_layer(b.il)]

    def _levers_here(self) -> None:
        if self.gpu is not None:
            raise UnsupportedError("expert masks and min_expert_weight run on the CPU only (not with --device cuda)")

    def set_min_expert_weight(self, w: float | None) -> None:
        """Skip picked experts whose normalised routing weight is below w, per token (None or 0:
        off, the default; see localmoe.routing). Resets the cache, computed with the old routing."""
        w = check_min_weight(w)
        if w:
            self._levers_here()
        with self._lock.held():
            for blk in self.blocks:
                blk.min_weight = w
            self.reset()

    def mask_experts(self, keep: dict[int, Sequence[int]] | None) -> None:
        """Restrict the router of each named layer to the experts `keep[layer]` (ids); unnamed layers
        keep all, None lifts every mask. Dropped experts are never picked (see localmoe.routing).
        Replaces the previous mask; resets the cache."""
        masks = {} if keep is None else keep_arrays(keep, self.args.n_layer, self.args.n_expert,
                                                    self._moe_layers(), self.args.n_expert_used)
        if masks:
            self._levers_here()
        with self._lock.held():
            for blk in self.blocks:
                blk.keep = masks.get(blk.il)
            self.reset()

    def drop_experts(self, fraction: float, counts) -> dict[int, list[int]]:
        """Mask away `fraction` of each expert layer's experts, the least routed first by counts
        i[n_layer, n_expert] (ExpertStore.counts, or a --stats-out profile's); returns the kept ids."""
        c = np.asarray(counts)
        shape = (self.args.n_layer, self.args.n_expert)
        if c.shape != shape or c.dtype.kind not in "iu" or (c < 0).any():
            raise LocalMoEError(f"expert counts must be {shape[0]} x {shape[1]} non-negative integers, "
                                f"got {c.dtype} {c.shape}")
        keep = least_used(c, fraction, self._moe_layers())
        self.mask_experts(keep)
        return keep

    def routing_stats(self) -> dict:
        """Since the last reset_routing_stats: (token, expert layer) pairs routed, and the mean number of
        experts computed per token and expert layer (n_expert_used unless a lever skips some)."""
        blocks = [b for b in self.blocks if b.n_routed]
        routed = sum(b.n_routed for b in blocks)
        return {"token_layers_routed": routed, "n_expert_used": self.args.n_expert_used,
                "mean_experts_run": sum(b.n_run for b in blocks) / routed if routed else None,
                "min_expert_weight": self.blocks[0].min_weight if self.blocks else 0.0,
                "kept_experts": {b.il: int(b.keep.sum()) for b in self.blocks if b.keep is not None}}

    def reset_routing_stats(self) -> None:
        for blk in self.blocks:
            blk.n_routed = blk.n_run = 0

    def generate_tokens(self, prompt_tokens: Sequence[int], max_tokens: int = 128,
                        **sampling) -> Iterator[int]:
        """Sampled token ids after the prompt (which starts a fresh cache); stops at end-of-generation.

        The generation holds the model's lock from its first step to its end: other threads'
        generate/forward/eval calls on this Model wait for it (they are serialised, never
        interleaved). Closing the generator (or dropping it) releases the lock early; one left
        suspended and referenced keeps the model busy."""
        from localmoe.sampling import Sampler
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
            raise LocalMoEError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        prompt = list(prompt_tokens)
        if not prompt:
            raise LocalMoEError("the prompt is empty")
        self._token_ids(prompt)
        sampler = Sampler(**sampling)
        return hold_while_iterating(self._lock, self._generate_tokens(prompt, max_tokens, sampler))

    def _generate_tokens(self, prompt: list[int], max_tokens: int, sampler) -> Iterator[int]:
        eog = self.tokenizer.is_eog
        self.reset()
        t0 = time.perf_counter()
        logits = self.forward(prompt, all_logits=False)[-1]
        self.timings = Timings(len(prompt), time.perf_counter() - t0)
        history = list(prompt)
        self.timings.stop = "length"
        for i in range(max_tokens):
            tok = sampler.sample(logits, history)
            if eog(tok):
                self.timings.stop = "end"
                return
            yield tok
            history.append(tok)
            if i + 1 == max_tokens:
                return
            if len(history) >= self.n_ctx:
                self.timings.stop = "context"
                return
            t0 = time.perf_counter()
            logits = self.forward([tok])[0]
            self.timings.n_decode += 1
            self.timings.t_decode += time.perf_counter() - t0

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] | str | None = None) -> Iterator[str]:
        """Stream text pieces of a completion of `prompt`; cut before the first stop string."""
        from localmoe.sampling import StopStrings
        from localmoe.tokenizer import Detokenizer
        stops = StopStrings([stop] if isinstance(stop, str) else list(stop or []))
        detok = Detokenizer(self.tokenizer, at_start=False)  # a continuation keeps its leading space
        toks = self.generate_tokens(self.tokenize(prompt), max_tokens, temperature=temperature,
                                    top_k=top_k, top_p=top_p, min_p=min_p,
                                    repeat_penalty=repeat_penalty, seed=seed)
        for tok in toks:
            text, stopped = stops.feed(detok.feed(tok))
            if text:
                yield text
            if stopped:
                toks.close()
                self.timings.stop = "stop"
                return
        text, _ = stops.feed(detok.flush())
        tail = text + stops.flush()
        if tail:
            yield tail

    # --- text ----------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from localmoe.tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_gguf(self.file.metadata)
        return self._tokenizer

    def tokenize(self, text: str, add_special: bool = True, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))


def load(path, n_threads: int | None = None, n_ctx: int | None = None,
         n_expert_used: int | None = None, min_expert_weight: float | None = None,
         mask_experts: dict | None = None, drop_experts: float | None = None, drop_profile=None,
         **planner_opts) -> Model:
    """Open a GGUF MoE model. n_expert_used overrides {arch}.expert_used_count like
    llama.cpp's --override-kv; n_threads sets numba's thread count. planner_opts:
    ram_budget, policy, expert_profile, prefetch, n_seq (see Model; localmoe.planner), gpu_budget,
    device (localmoe.gpu). The study levers (localmoe.routing; off by default, they change the logits):
    min_expert_weight (Model.set_min_expert_weight), mask_experts {layer: kept ids}
    (Model.mask_experts), or drop_experts (a fraction) with drop_profile (a --stats-out file or
    its counts array) for Model.drop_experts."""
    from localmoe.gguf_file import open_gguf
    if not isinstance(path, (str, os.PathLike)):
        raise LocalMoEError(f"load() needs the path of a GGUF file, got {type(path).__name__}")
    min_expert_weight = check_min_weight(min_expert_weight)
    if (drop_experts is None) != (drop_profile is None):
        raise LocalMoEError("drop_experts (a fraction) and drop_profile (expert counts) go together")
    if drop_experts is not None and mask_experts is not None:
        raise LocalMoEError("give mask_experts or drop_experts, not both")
    unknown = set(planner_opts) - {"ram_budget", "policy", "expert_profile", "prefetch", "gpu_budget", "device",
                                   "n_seq"}
    if unknown:
        raise LocalMoEError(f"unknown load options: {', '.join(sorted(unknown))}")
    if planner_opts.get("ram_budget") is not None:
        from localmoe.planner import prefer_passive_omp
        prefer_passive_omp()  # before numba's thread pool starts
    if n_threads is not None:
        import numba
        if not 1 <= n_threads <= numba.config.NUMBA_NUM_THREADS:
            raise LocalMoEError(f"n_threads must be in 1..{numba.config.NUMBA_NUM_THREADS}, got {n_threads}")
        numba.set_num_threads(int(n_threads))
    m = Model(open_gguf(path), n_ctx=n_ctx, n_expert_used=n_expert_used, **planner_opts)
    try:
        if min_expert_weight:
            m.set_min_expert_weight(min_expert_weight)
        if mask_experts is not None:
            m.mask_experts(mask_experts)
        if drop_experts is not None:
            if isinstance(drop_profile, (str, os.PathLike)):
                from localmoe.planner import load_profile
                drop_profile = load_profile(drop_profile, m.args.n_layer, m.args.n_expert)
            m.drop_experts(drop_experts, drop_profile)
    except BaseException:
        m.close()
        raise
    return m

"""The worker: one thread owns the Model and serves generation jobs, admitted in FIFO order.

Only this thread ever calls the Model (forward, cache, close) or loads one; the event loop
submits Jobs and reads their events from an asyncio queue. Up to n_parallel jobs run at once,
each in a slot with a KV cache of its own, and every step evaluates all of them in one batch
(Model.forward_seqs: a new prompt, and one token of each reply under way), as llama-server's
slots do; each reply is the one it would be alone. A slot keeps its KV cache after its job:
a request whose prompt starts with a slot's cached tokens goes to that slot and evaluates
only the rest.
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import queue
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from localmoe.chat import common_prefix
from localmoe.errors import LocalMoEError

log = logging.getLogger("localmoe.server")
_ids = itertools.count(1)
WARM_TOKENS = 48  # the warm-up batch: past the serial thresholds of the kernels a prompt uses
MAX_KEPT = 64  # requests whose expert counts GET /v1/experts?id= can still return


class ApiError(LocalMoEError):
    """An HTTP error with OpenAI's error fields."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}


@dataclass
class GenRequest:
    """A validated generation request: chat messages, or a completion prompt (text or ids)."""

    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    sampling: dict = field(default_factory=dict)   # Sampler keyword arguments
    max_tokens: int = -1                            # < 0: until the end of the turn or a full context
    stop: list[str] = field(default_factory=list)
    model: str | None = None                        # the model's path (Engine.resolve); None: the resident one
    cache_prompt: bool = True
    split_reasoning: bool = True


class Job:
    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop, prefix: str):
        self.id = f"{prefix}-{next(_ids)}-{os.urandom(4).hex()}"
        self.req, self.loop = req, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.t_arrive = time.perf_counter()

    def post(self, *event) -> None:
        """From the worker: ("start", info), ("delta", content, reasoning), then ("done", stats) or ("error", ApiError)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Loaded:
    """The resident model and what requests need from it. The event loop reads it; the
    worker replaces it (never mutates it) when it swaps models."""

    model: object
    name: str
    path: str
    tokenizer: object
    template: object
    template_error: str | None
    stops: list[str]
    load_seconds: float
    base_counts: np.ndarray  # store.counts after the warm-up
    moe_layers: list[int]
    facts: dict              # info.read_facts


@dataclass
class RequestCounts:
    id: str | None = None
    active: bool = False
    n_tokens: int = 0
    counts: np.ndarray | None = None   # i64[n_layer, n_expert]: tokens this request routed so far


@dataclass
class Slot:
    """A KV cache and the token ids in it; `run` is the job using it, if any."""

    cache: object
    tokens: list[int] = field(default_factory=list)
    run: "Run | None" = None
    used: int = 0  # when it was last given a job (least recently used goes first)


@dataclass
class Run:
    """A job in a slot: its prompt still to evaluate, then one sampled token per step."""

    job: Job
    slot: Slot
    n_prompt: int
    keep: int
    pending: list[int]               # token ids to evaluate next
    sampler: object
    stops: object
    detok: object
    split: object
    counts: RequestCounts
    load_s: float
    n_gen: int = 0
    reason: str | None = None
    t0: float = field(default_factory=time.perf_counter)
    t_prompt: float | None = None    # seconds from admission to the prompt's logits
    t1: float = 0.0                  # when decoding began


class Engine:
    def __init__(self, model_path, models_dir=None, load_opts: dict | None = None, max_queue: int = 16,
                 reasoning: bool = True, n_parallel: int = 4):
        self.initial = str(Path(model_path).resolve())
        self.models_dir = Path(models_dir).resolve() if models_dir else None
        self.load_opts = dict(load_opts or {})
        self.max_queue, self.reasoning = max_queue, reasoning
        self.n_parallel = max(1, int(n_parallel))
        self.loaded: Loaded | None = None
        self.state, self.error = "loading", None     # loading | ok | error
        self.fatal = None                            # the first load's error: the server exits
        self.on_fatal = lambda: None                 # called on the worker when the first load fails
        self.on_exit = lambda model: None            # called on the worker before the model closes
        self.current = RequestCounts()               # the request admitted last
        self._requests: OrderedDict[str, RequestCounts] = OrderedDict()  # the last MAX_KEPT requests
        self.total_tokens = 0
        self._slots: list[Slot] = []
        self._active: list[Run] = []
        self._held: Job | None = None                # the next job, waiting for the running ones (a model swap)
        self._admitted = 0
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._jobs: set[Job] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="localmoe-worker", daemon=True)

    # --- event-loop side ---------------------------------------------------

    def start(self) -> None:
        # OpenMP workers that spin between kernels hold the cores the event loop needs to
        # stream each token: on a busy 2-core machine decode ran at 2-5 tokens/s with spinning
        # workers and 85-250 with sleeping ones (shipped model, 32 tokens). Set before the
        # worker's first kernel starts numba's pool.
        from localmoe.planner import prefer_passive_omp
        prefer_passive_omp()
        self._thread.start()

    def models(self) -> dict[str, str]:
        """Model id (file name without .gguf) -> path: the first model, then models_dir's GGUFs."""
        out = {Path(self.initial).stem: self.initial}
        if self.models_dir is not None:
            try:
                found = sorted(p for p in self.models_dir.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
            except OSError:
                found = []
            for p in found:
                out.setdefault(p.stem, str(p.resolve()))
        if self.loaded is not None:
            out.setdefault(self.loaded.name, self.loaded.path)
        return out

    def resolve(self, name) -> str | None:
        """The path a request's model name selects; None for the resident model. Without
        --models-dir every name means the resident model (as llama-server)."""
        if self.models_dir is None or name in (None, ""):
            return None
        if not isinstance(name, str):
            raise ApiError(400, "'model' must be a string", param="model")
        models = self.models()
        key = name[:-len(":latest")] if name.endswith(":latest") else name
        key = key[:-5] if key.lower().endswith(".gguf") else key
        if key not in models:
            raise ApiError(404, f"model '{name}' not found; available: {', '.join(models)}",
                           code="model_not_found", param="model", type_="not_found_error")
        return models[key]

    @property
    def n_waiting(self) -> int:
        """Requests queued, not yet running."""
        return self._waiting + (self._held is not None)

    @property
    def n_running(self) -> int:
        return len(self._active)

    def submit(self, req: GenRequest, prefix: str) -> Job:
        job = Job(req, asyncio.get_running_loop(), prefix)
        with self._lock:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", code="unavailable")
            if self._waiting >= self.max_queue:
                raise ApiError(503, f"the server is busy: {self._waiting} requests are waiting (--max-queue "
                                    f"{self.max_queue}); retry later", code="queue_full", headers={"Retry-After": "2"})
            self._waiting += 1
            self._jobs.add(job)
        self._q.put(job)
        return job

    def cancel_all(self) -> None:
        """Shutdown: no new jobs; running and waiting ones end at their next token."""
        with self._lock:
            self._stopping = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()

    def stop(self, timeout: float = 30.0) -> None:
        self.cancel_all()
        self._q.put(None)
        self._thread.join(timeout)

    def expert_counts(self, request_id: str | None = None) -> dict | None:
        """Tokens routed per layer and expert: by one request (`request_id`, one of the last
        MAX_KEPT; default the one admitted last), and in total since the model loaded."""
        L = self.loaded
        if L is None:
            return None
        a = L.model.args
        now = L.model.store.counts.copy()  # the worker may be adding to it: a snapshot at most one layer behind
        cur = self.current if request_id is None else self._requests.get(request_id)
        if cur is None:
            raise ApiError(404, f"no recent request has id {request_id!r}", param="id", type_="not_found_error")
        req = cur.counts.copy() if cur.counts is not None and cur.counts.shape == now.shape else np.zeros_like(now)
        return {"n_layer": a.n_layer, "n_expert": a.n_expert, "n_expert_used": a.n_expert_used,
                "moe_layers": L.moe_layers,
                "request": {"id": cur.id, "active": cur.active, "n_tokens": cur.n_tokens, "counts": req.tolist()},
                "total": {"n_tokens": self.total_tokens, "counts": (now - L.base_counts).tolist()}}

    # --- worker side ---------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load(self.initial)
        except BaseException as e:  # noqa: BLE001 - reported, and the server exits
            self.state, self.error, self.fatal = "error", _describe(e), e
            self.on_fatal()  # the server stops; `localmoe serve` prints the error
        stopping = False
        while True:
            while not stopping and len(self._active) < max(1, len(self._slots)):  # no slots: no model
                job, self._held = self._held, None
                if job is None:
                    try:
                        job = self._q.get(block=not self._active)
                    except queue.Empty:
                        break
                    if job is None:
                        stopping = True
                        break
                    with self._lock:
                        self._waiting -= 1
                if self._active and self._swaps(job):  # a model swap waits for the running jobs
                    self._held = job
                    break
                self._admit(job)
            if not self._active:
                if stopping:
                    break
                continue
            self._step()
        if self._held is not None:
            self._held.post("error", ApiError(503, "the server is stopping", code="cancelled"))
        if self.loaded is not None:
            try:
                self.on_exit(self.loaded.model)
            except Exception as e:  # noqa: BLE001 - e.g. --stats-out unwritable: say so, still close
                log.error("%s", _describe(e))
        self._unload()

    def _swaps(self, job: Job) -> bool:
        path = job.req.model
        return path is not None and self.loaded is not None and self.loaded.path != path

    def _admit(self, job: Job) -> None:
        """Start a job in a free slot, or answer it with its error."""
        try:
            if job.cancelled.is_set():
                raise ApiError(503, "the request was cancelled (the client left or the server is stopping)",
                               code="cancelled")
            if self.loaded is None and self.fatal is not None:
                raise ApiError(503, f"no model is loaded: {self.error}", code="unavailable")
            self._active.append(self._begin(job))
        except Exception as e:  # noqa: BLE001 - a bad request or a bug must not stop the worker
            self._fail(job, e)
        finally:
            if not any(r.job is job for r in self._active):
                with self._lock:
                    self._jobs.discard(job)

    def _fail(self, job: Job, e: BaseException) -> None:
        if isinstance(e, ApiError):
            job.post("error", e)
        elif isinstance(e, LocalMoEError):
            job.post("error", ApiError(400, str(e)))
        else:
            log.error("request %s failed:\n%s", job.id, "".join(traceback.format_exception(e)))
            job.post("error", ApiError(500, f"internal error: {_describe(e)}"))

    def _load(self, path: str) -> None:
        from localmoe.chat import reply_stops
        from localmoe.chat_template import ChatTemplate, ChatTemplateError
        from localmoe.model import load
        self.state = "loading"
        t0 = time.perf_counter()
        # a RAM budget holds every slot's KV cache (the GPU runner serves one sequence)
        gpu = self.load_opts.get("device") == "cuda" or self.load_opts.get("gpu_budget") is not None
        m = load(path, **self.load_opts, **({} if gpu or self.n_parallel == 1 else {"n_seq": self.n_parallel}))
        try:
            tok = m.tokenizer
            template, template_error, stops = None, None, []
            try:
                template = ChatTemplate.from_metadata(m.file.metadata, tok)
                stops = reply_stops(template, tok)
            except ChatTemplateError as e:
                template_error = str(e)
            self._warm_up(m, tok, template)
        except BaseException:
            m.close()
            raise
        store = m.store
        moe = [il for il in range(m.args.n_layer)
               if any(store.has(il, n) for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))]
        # slot 0 uses the model's own cache; the GPU runner keeps one cache on the device
        n = 1 if m.gpu is not None else self.n_parallel
        self._slots = [Slot(m.cache)] + [Slot(m.new_cache()) for _ in range(n - 1)]
        self.total_tokens = 0
        self.current = RequestCounts()
        self._requests.clear()
        from .info import read_facts
        self.loaded = Loaded(m, Path(path).stem, path, tok, template, template_error, stops,
                             time.perf_counter() - t0, store.counts.copy(), moe, read_facts(m, template is not None))
        self.state, self.error = "ok", None
        log.info("loaded %s in %.1f s", path, self.loaded.load_seconds)

    @staticmethod
    def _warm_up(m, tok, template) -> None:
        """Load/compile now what a request runs, so that the first one does not pay for it: the
        request path's modules, a chat prompt, sampling, and forward_seqs over a short prompt, a
        decode step and a batch long enough for the prefill kernels."""
        from localmoe.chat import prompt_tokens
        from localmoe.sampling import Sampler
        from localmoe.tokenizer import Detokenizer
        from .reasoning import ThinkSplitter  # noqa: F401 - imported for the first request
        from localmoe.chat_template import ChatTemplateError
        if template is not None:
            try:
                prompt_tokens(tok, template, [{"role": "user", "content": "Hi"}])
            except ChatTemplateError:
                pass  # a template that refuses is each chat request's 400, not a load failure
        hi = tok.encode("Hi there", add_special=False)[:2] or [0]
        logits = m.forward_seqs([(m.cache, hi)])[0]
        Detokenizer(tok).feed(Sampler(temperature=0.8, seed=0).sample(logits, hi))
        m.forward_seqs([(m.cache, [0])])
        m.reset()
        m.forward_seqs([(m.cache, (hi * WARM_TOKENS)[:max(1, min(WARM_TOKENS, m.n_ctx - 1))])])
        m.reset()

    def _unload(self) -> None:
        L, self.loaded = self.loaded, None
        self._slots = []
        if L is not None:
            L.model.close()
            del L
            gc.collect()

    def _ensure(self, path: str | None) -> float:
        """Make `path` the resident model (the old one is closed first); seconds spent loading."""
        if path is None or (self.loaded is not None and self.loaded.path == path):
            return 0.0
        old = self.loaded.path if self.loaded is not None else None
        self.state = "loading"
        self._unload()
        t0 = time.perf_counter()
        try:
            self._load(path)
        except BaseException as e:
            err = _describe(e)
            if old is not None:
                try:
                    self._load(old)
                except BaseException as e2:  # noqa: BLE001
                    self.state, self.error = "error", _describe(e2)
            raise ApiError(500, f"cannot load {Path(path).name}: {err}", code="model_load_failed") from None
        return time.perf_counter() - t0

    def _prompt(self, L: Loaded, req: GenRequest) -> tuple[list[int], bool]:
        """Prompt token ids, and whether the template already opened a <think> block."""
        from localmoe.chat import prompt_tokens
        from localmoe.chat_template import ChatTemplateError
        tok = L.tokenizer
        if req.messages is None:
            ids = (list(req.prompt) if isinstance(req.prompt, list)
                   else tok.encode(req.prompt, add_special=True))
            bad = [t for t in ids if not 0 <= t < L.model.n_vocab]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{L.model.n_vocab - 1})",
                               param="prompt")
            return ids, False
        if L.template is None:
            raise ApiError(400, L.template_error, code="chat_template_error")
        try:
            ids = prompt_tokens(tok, L.template, req.messages)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), code="chat_template_error", param="messages") from None
        tail = tok.decode(ids[-16:], special=True).rstrip()
        return ids, tail.endswith("<think>")

    def _slot_for(self, ids: list[int], cache_prompt: bool) -> Slot:
        """The free slot whose cached tokens share the longest prefix with ids (with the
        prompt cache on), else the least recently used one."""
        free = [s for s in self._slots if s.run is None]
        if cache_prompt:
            return max(free, key=lambda s: (common_prefix(s.tokens, ids), -s.used))
        return min(free, key=lambda s: s.used)

    def _begin(self, job: Job) -> Run:
        from localmoe.sampling import Sampler, StopStrings
        from localmoe.tokenizer import Detokenizer
        from .reasoning import ThinkSplitter
        req = job.req
        load_s = self._ensure(req.model)
        L = self.loaded
        m, tok = L.model, L.tokenizer
        ids, in_think = self._prompt(L, req)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(ids) >= m.n_ctx:
            raise ApiError(400, f"the prompt is {len(ids)} tokens but the context holds {m.n_ctx} tokens "
                                f"(and at least one must stay free for the reply); shorten it or restart "
                                f"the server with a larger --ctx", code="context_length_exceeded",
                           param="messages" if req.messages is not None else "prompt")
        sampler = Sampler(**req.sampling)
        slot = self._slot_for(ids, req.cache_prompt)
        # keep the cached prefix; at least the last prompt token is evaluated: it gives the logits
        keep = max(0, min(common_prefix(slot.tokens, ids), len(ids) - 1)) if req.cache_prompt else 0
        del slot.tokens[keep:]
        slot.cache.truncate(keep)
        self._admitted += 1
        slot.used = self._admitted
        cur = self.current = RequestCounts(job.id, True, 0, np.zeros_like(m.store.counts))
        self._requests[job.id] = cur
        while len(self._requests) > MAX_KEPT:
            self._requests.popitem(last=False)
        run = Run(job, slot, len(ids), keep, ids[keep:], sampler,
                  StopStrings((L.stops if req.messages is not None else []) + list(req.stop)),
                  Detokenizer(tok, at_start=req.messages is not None),
                  ThinkSplitter(in_think) if (self.reasoning and req.split_reasoning) else None, cur, load_s)
        slot.run = run
        job.post("start", {"model": L.name, "prompt_tokens": len(ids), "cached_tokens": keep})
        return run

    def _step(self) -> None:
        """One forward pass over every running job: one token of each reply under way, then
        as much of the new prompts as fits in a micro-batch; then sample, stream, finish."""
        from localmoe.model import N_UBATCH
        m = self.loaded.model
        room, batch = N_UBATCH, []
        for run in sorted(self._active, key=lambda r: len(r.pending) > 1):  # replies first
            if run.job.cancelled.is_set():
                run.reason = "cancelled"
            elif room:
                batch.append((run, run.pending[:room]))
                room -= len(batch[-1][1])
        if batch:
            m.store.seq_counts = [r.counts.counts for r, _ in batch]
            try:
                logits = m.forward_seqs([(r.slot.cache, t) for r, t in batch])
            except Exception as e:  # noqa: BLE001 - fails the batch's jobs, not the worker
                for r, _ in batch:
                    r.reason = "error"
                    self._fail(r.job, e)
                logits = None
            finally:
                m.store.seq_counts = None
            now = time.perf_counter()
            for i, (run, toks) in enumerate(batch if logits is not None else []):
                run.slot.tokens += toks
                del run.pending[:len(toks)]
                run.counts.n_tokens += len(toks)
                self.total_tokens += len(toks)
                if run.pending:
                    continue  # more of the prompt next step
                if run.t_prompt is None:
                    run.t_prompt, run.t1 = now - run.t0, now
                try:
                    self._next_token(run, logits[i])
                except Exception as e:  # noqa: BLE001
                    run.reason = "error"
                    self._fail(run.job, e)
        for run in [r for r in self._active if r.reason is not None]:
            self._active.remove(run)
            self._finish(run)

    def _next_token(self, run: Run, logits: np.ndarray) -> None:
        """Sample after `logits`, stream the text; set run.reason when the reply ends, else
        queue the token for the next step."""
        req, tok, m = run.job.req, self.loaded.tokenizer, self.loaded.model
        if 0 <= req.max_tokens <= run.n_gen:
            run.reason = "length"
            return
        if run.job.cancelled.is_set():
            run.reason = "cancelled"
            return
        t = run.sampler.sample(logits, run.slot.tokens)
        if tok.is_eog(t):
            run.reason = "stop"
            return
        run.n_gen += 1
        text, stopped = run.stops.feed(run.detok.feed(t))
        if text:
            self._emit(run, text)
        if stopped:
            run.reason = "stop"
        elif len(run.slot.tokens) >= m.n_ctx or 0 <= req.max_tokens <= run.n_gen:
            run.reason = "length"
        elif run.job.cancelled.is_set():
            run.reason = "cancelled"
        else:
            run.pending = [t]

    def _emit(self, run: Run, text: str) -> None:
        c, r = run.split.feed(text) if run.split else (text, "")
        if c or r:
            run.job.post("delta", c, r)

    def _finish(self, run: Run) -> None:
        slot, job = run.slot, run.job
        del slot.tokens[slot.cache.n_past:]  # a failed forward may have stored less
        slot.run = None
        run.counts.active = False
        with self._lock:
            self._jobs.discard(job)
        if run.reason == "error":
            return
        if not run.stops.stopped:
            text, _ = run.stops.feed(run.detok.flush())
            text += run.stops.flush()
            if text:
                self._emit(run, text)
        if run.split:
            c, r = run.split.flush()
            if c or r:
                job.post("delta", c, r)
        now = time.perf_counter()
        t_prompt = now - run.t0 if run.t_prompt is None else run.t_prompt
        job.post("done", {
            "finish_reason": run.reason, "prompt_tokens": run.n_prompt, "cached_tokens": run.keep,
            "prompt_n": run.n_prompt - run.keep, "prompt_ms": t_prompt * 1e3, "completion_tokens": run.n_gen,
            "predicted_ms": (now - run.t1) * 1e3 if run.t_prompt is not None else 0.0,
            "load_ms": run.load_s * 1e3, "total_ms": (now - job.t_arrive) * 1e3, "model": self.loaded.name})


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, LocalMoEError) else f"{type(e).__name__}: {e}"

"""The worker: one thread owns the Model and serves generation jobs in FIFO order.

Only this thread ever calls the Model (forward, cache, close) or loads one; the event loop
submits Jobs and reads their events from an asyncio queue. The KV cache of the last request
stays: a request whose prompt starts with the cached tokens evaluates only the rest.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from localmoe.errors import LocalMoEError

log = logging.getLogger("localmoe.server")
_ids = itertools.count(1)


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
    counts0: np.ndarray | None = None  # store.counts when the request started
    counts: np.ndarray | None = None   # tokens routed by this request, once it has ended


class Engine:
    def __init__(self, model_path, models_dir=None, load_opts: dict | None = None, max_queue: int = 16,
                 reasoning: bool = True):
        self.initial = str(Path(model_path).resolve())
        self.models_dir = Path(models_dir).resolve() if models_dir else None
        self.load_opts = dict(load_opts or {})
        self.max_queue, self.reasoning = max_queue, reasoning
        self.loaded: Loaded | None = None
        self.state, self.error = "loading", None     # loading | ok | error
        self.fatal = None                            # the first load's error: the server exits
        self.on_fatal = lambda: None                 # called on the worker when the first load fails
        self.on_exit = lambda model: None            # called on the worker before the model closes
        self.current = RequestCounts()
        self.total_tokens = 0
        self._cached: list[int] = []                 # token ids in the model's KV cache
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._jobs: set[Job] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="localmoe-worker", daemon=True)

    # --- event-loop side ---------------------------------------------------

    def start(self) -> None:
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
        """Requests queued behind the running one."""
        return self._waiting

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

    def expert_counts(self) -> dict | None:
        L = self.loaded
        if L is None:
            return None
        store, a = L.model.store, L.model.args
        now = store.counts.copy()  # the worker may be adding to it: a snapshot at most one layer behind
        cur = self.current
        if cur.active and cur.counts0 is not None and cur.counts0.shape == now.shape:
            req = now - cur.counts0
        else:
            req = cur.counts if cur.counts is not None and cur.counts.shape == now.shape else np.zeros_like(now)
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
            log.error("cannot load %s: %s", self.initial, self.error)
            self.on_fatal()
        while True:
            job = self._q.get()
            if job is None:
                break
            with self._lock:
                self._waiting -= 1
            try:
                if job.cancelled.is_set():
                    raise ApiError(503, "the request was cancelled (the client left or the server is stopping)",
                                   code="cancelled")
                if self.loaded is None and self.fatal is not None:
                    raise ApiError(503, f"no model is loaded: {self.error}", code="unavailable")
                self._serve(job)
            except ApiError as e:
                job.post("error", e)
            except LocalMoEError as e:
                job.post("error", ApiError(400, str(e)))
            except Exception as e:  # noqa: BLE001 - a bug must not stop the worker
                log.error("request %s failed:\n%s", job.id, traceback.format_exc())
                job.post("error", ApiError(500, f"internal error: {_describe(e)}"))
            finally:
                with self._lock:
                    self._jobs.discard(job)
        if self.loaded is not None:
            try:
                self.on_exit(self.loaded.model)
            except Exception as e:  # noqa: BLE001 - e.g. --stats-out unwritable: say so, still close
                log.error("%s", _describe(e))
        self._unload()

    def _load(self, path: str) -> None:
        from localmoe.chat import reply_stops
        from localmoe.chat_template import ChatTemplate, ChatTemplateError
        from localmoe.model import load
        self.state = "loading"
        t0 = time.perf_counter()
        m = load(path, **self.load_opts)
        try:
            tok = m.tokenizer
            template, template_error, stops = None, None, []
            try:
                template = ChatTemplate.from_metadata(m.file.metadata, tok)
                stops = reply_stops(template, tok)
            except ChatTemplateError as e:
                template_error = str(e)
            # compile/warm the kernels now, so that the first request does not pay for it
            m.forward(tok.encode("Hi there", add_special=False)[:2] or [0])
            m.forward([0])
            m.reset()
        except BaseException:
            m.close()
            raise
        store = m.store
        moe = [il for il in range(m.args.n_layer)
               if any(store.has(il, n) for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))]
        self._cached = []
        self.total_tokens = 0
        self.current = RequestCounts()
        from .info import read_facts
        self.loaded = Loaded(m, Path(path).stem, path, tok, template, template_error, stops,
                             time.perf_counter() - t0, store.counts.copy(), moe, read_facts(m, template is not None))
        self.state, self.error = "ok", None
        log.info("loaded %s in %.1f s", path, self.loaded.load_seconds)

    def _unload(self) -> None:
        L, self.loaded = self.loaded, None
        self._cached = []
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

    def _serve(self, job: Job) -> None:
        from localmoe.chat import reuse_prefix
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
        if not req.cache_prompt:
            self._cached = []
        keep = reuse_prefix(m, self._cached, ids)
        stops = StopStrings((L.stops if req.messages is not None else []) + list(req.stop))
        detok = Detokenizer(tok, at_start=req.messages is not None)
        split = ThinkSplitter(in_think) if (self.reasoning and req.split_reasoning) else None
        cur = self.current = RequestCounts(job.id, True, 0, m.store.counts.copy())
        job.post("start", {"model": L.name, "prompt_tokens": len(ids), "cached_tokens": keep})

        def emit(text: str) -> None:
            c, r = split.feed(text) if split else (text, "")
            if c or r:
                job.post("delta", c, r)

        n_gen, reason = 0, None
        t0 = time.perf_counter()
        t_prompt = t_decode = 0.0
        try:
            new = ids[keep:]
            self._cached += new
            logits = m.forward(new, all_logits=False)[-1]
            cur.n_tokens += len(new)
            self.total_tokens += len(new)
            t_prompt = time.perf_counter() - t0
            t1 = time.perf_counter()
            while True:
                if 0 <= req.max_tokens <= n_gen:
                    reason = "length"
                    break
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
                t = sampler.sample(logits, self._cached)
                if tok.is_eog(t):
                    reason = "stop"
                    break
                n_gen += 1
                text, stopped = stops.feed(detok.feed(t))
                if text:
                    emit(text)
                if stopped:
                    reason = "stop"
                    break
                if len(self._cached) >= m.n_ctx or 0 <= req.max_tokens <= n_gen:
                    reason = "length"
                    break
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
                self._cached.append(t)
                logits = m.forward([t], all_logits=False)[-1]
                cur.n_tokens += 1
                self.total_tokens += 1
            if not stops.stopped:
                text, _ = stops.feed(detok.flush())
                text += stops.flush()
                if text:
                    emit(text)
            if split:
                c, r = split.flush()
                if c or r:
                    job.post("delta", c, r)
            t_decode = time.perf_counter() - t1
        finally:
            del self._cached[m.cache.n_past:]  # an interrupted forward may have stored less
            cur.counts = m.store.counts - cur.counts0
            cur.active = False
        job.post("done", {
            "finish_reason": reason, "prompt_tokens": len(ids), "cached_tokens": keep,
            "prompt_n": len(ids) - keep, "prompt_ms": t_prompt * 1e3, "completion_tokens": n_gen,
            "predicted_ms": t_decode * 1e3, "load_ms": load_s * 1e3,
            "total_ms": (time.perf_counter() - job.t_arrive) * 1e3, "model": L.name})


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, LocalMoEError) else f"{type(e).__name__}: {e}"

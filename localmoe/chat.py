"""ChatSession: a conversation with a loaded Model, without any terminal I/O.

It owns the message history, turns it into prompt tokens through the model's
chat template, and keeps the model's KV cache in step with `_cached` (the
token ids in the cache) so each turn evaluates only the tokens after the
longest prefix the cache already holds, as llama-cpp-python does.

Decisions:
- Message text can never become a control token: control-token text inside a
  message is swapped for placeholder characters before rendering, the template
  output is split at its own special tokens, and the placeholders go back as
  plain text (`prompt_tokens`). Without such text the ids equal llama.cpp's
  tokenization of the rendered prompt with special parsing on.
- BOS/EOS follow the vocab (add_bos/add_eos) as llama.cpp's chat code does,
  never doubled when the template itself emits bos_token/eos_token text.
- A reply cut short (Ctrl-C, max_tokens, full context) stays in the history
  as the text the user saw: templates that require alternating roles keep
  working and the next turn can refer to it.
- When a turn would not fit in n_ctx the oldest messages leave the context
  (the system prompt stays; the saved history keeps them); a prompt that
  cannot fit even alone is refused and the session goes on.
- A reply holds the model's lock while it is iterated (Model.generate_tokens):
  sessions and other users of one Model take turns, a reply at a time. The
  KV reuse assumes the cache still holds this session's tokens: it does only
  if no one else used the model since (`Model.cache_user` is this session);
  otherwise the whole prompt is evaluated again.
- Text (messages, the system prompt, saved chats) follows the tokenizer's rule:
  invalid UTF-8 becomes U+FFFD (localmoe.tokenizer.text).
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from localmoe.atomic import write_atomic
from localmoe.chat_template import ChatTemplate
from localmoe.errors import LocalMoEError
from localmoe.model_lock import hold_while_iterating
from localmoe.sampling import Sampler, SamplingError, StopStrings
from localmoe.tokenizer.text import clean_text

FORMAT, VERSION = "localmoe-chat", 1
MAX_FILE_BYTES = 64 << 20
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")
FALLBACK_STOP = "\nUser:"  # the fallback template's next turn: the model must not write it
_PUA = 0xF0000  # Supplementary Private Use Area-A: placeholder characters


class ChatError(LocalMoEError):
    """A message, setting or conversation file the chat cannot use."""


class ContextFullError(ChatError):
    """A prompt that does not fit in the context even after dropping old turns."""


# --- prompt tokens -----------------------------------------------------------

def common_prefix(a, b) -> int:
    """How many leading ids a and b share."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def reuse_prefix(model, cached: list[int], tokens) -> int:
    """Keep the longest prefix of the KV cache that `tokens` starts with (at least the last
    token is left to evaluate: it gives the logits); `cached` (the ids in the cache) is cut to
    match. Returns the number of tokens kept."""
    keep = max(0, min(common_prefix(cached, tokens), len(tokens) - 1))
    del cached[keep:]
    model.cache.truncate(keep)
    return keep


def reply_stops(template: ChatTemplate, tokenizer) -> list[str]:
    """Where a reply ends besides an end-of-generation token: a turn suffix in plain text
    (a model trained without end-of-turn tokens writes it), or the fallback's next turn."""
    if template.is_fallback:
        return [FALLBACK_STOP]
    end = template.turn_end()
    specials = tokenizer.special_token_texts(True)
    return [end] if end and not any(t in end for t in specials) else []


def prompt_tokens(tokenizer, template: ChatTemplate, messages, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation; only the template's own text makes control tokens."""
    # texts that become tokens only with special parsing on (longest first); user-defined
    # tokens are parsed in any text, as llama.cpp does
    plain = set(tokenizer.special_token_texts(False))
    ctrl = [t for t in tokenizer.special_token_texts(True) if t not in plain]
    used = set(template.source).union(*(m["content"] for m in messages))
    free = (chr(c) for c in range(_PUA, _PUA + 0xFFFE) if chr(c) not in used)
    placeholder: dict[str, str] = {}  # control-token text -> a character no text uses

    def defuse(text: str) -> str:
        for t in ctrl:
            if t in text:
                if t not in placeholder:
                    placeholder[t] = next(free)
                text = text.replace(t, placeholder[t])
        return text

    safe = [dict(m, content=defuse(m["content"])) for m in messages]
    text = template.render(safe, add_generation_prompt=add_generation_prompt)
    ids: list[int] = []
    # tokenizer_st_partition with special parsing: here only template text holds control tokens
    for frag in tokenizer.partition(text, True):
        if isinstance(frag, int):
            ids.append(frag)
            continue
        for t, ph in placeholder.items():
            frag = frag.replace(ph, t)
        ids += tokenizer.encode(frag, add_special=False, special=False)
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids.insert(0, tokenizer.bos_id)
    if tokenizer.add_eos and tokenizer.eos_id is not None and ids[-1:] != [tokenizer.eos_id]:
        ids.append(tokenizer.eos_id)
    return ids


# --- replies -----------------------------------------------------------------

class Reply:
    """One assistant turn: iterate it for text pieces as they are generated."""

    def __init__(self, session: "ChatSession", tokens: list[int], dropped: int):
        self.dropped = dropped            # messages that left the context for this turn
        self.n_prompt_total = len(tokens)
        self.n_reused = self.n_prompt = self.n_decode = 0
        self.t_prompt = self.t_decode = 0.0
        self.text = ""
        self.stop_reason = None           # "end", "length", "context" or "interrupted"
        self.expert_hits = None           # i64[n_layer, n_expert]: tokens routed during this turn
        self._gen = hold_while_iterating(session.model._lock, session._generate(self, tokens))

    def __iter__(self):
        return self._gen

    @property
    def running(self) -> bool:
        """Started and not finished: it holds the model until iterated to the end or closed."""
        return inspect.getgeneratorstate(self._gen) == inspect.GEN_SUSPENDED

    def close(self) -> None:
        """Stop the reply (the partial text stays in the history) and release the model."""
        self._gen.close()


class ChatSession:
    def __init__(self, model, system: str | None = None, max_tokens: int = -1,
                 template: ChatTemplate | None = None, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: int | None = None):
        self.model = model
        self.tokenizer = model.tokenizer
        self.template = template or ChatTemplate.from_metadata(model.file.metadata, self.tokenizer)
        self.system = clean_text(system) if system else None
        self.messages: list[dict] = []    # user/assistant turns, the whole history
        self.start = 0                    # messages[start:] are in the context
        self.max_tokens = max_tokens      # per reply; < 0 = until end of turn or full context
        self.params = {}
        self.set_params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repeat_penalty=repeat_penalty, seed=seed)
        self._cached: list[int] = []      # token ids in the model's KV cache
        self.last: Reply | None = None
        self._warm: threading.Thread | None = None
        self._warm_error: BaseException | None = None
        self._k_loaded = model.args.n_expert_used  # what a --ram-budget plan was made for
        model.reset()

    # --- settings ------------------------------------------------------------

    def set_params(self, **params) -> None:
        unknown = set(params) - set(SAMPLING)
        if unknown:
            raise ChatError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        new = {**self.params, **params}
        self.sampler = Sampler(**new)     # validates; the session's draws restart from the seed
        self.params = new

    def set_max_tokens(self, n: int) -> None:
        self.max_tokens = int(n)

    def set_system(self, text: str | None) -> None:
        self.system = clean_text(text) if text else None

    def set_experts(self, k: int) -> None:
        """Active experts per token, changed in place; the cache is re-evaluated next turn."""
        self._ready()
        planned = self._k_loaded if getattr(self.model, "plan", None) is not None else None
        if planned is not None and k > planned:
            raise ChatError(f"the RAM budget was planned for {planned} experts per token; for more, "
                            f"restart with --experts-per-token {k}")
        self.model.set_expert_used(k)
        self._cached = []

    def clear(self) -> None:
        self.messages, self.start, self.last = [], 0, None

    def info(self) -> dict:
        """The model as /show info describes it."""
        from gguf import LlamaFileType
        a, f = self.model.args, self.model.file
        ft = f.metadata.get("general.file_type")
        if ft in LlamaFileType._value2member_map_:
            ft = LlamaFileType(ft).name
        return {"file": f.path, "name": f.metadata.get("general.name"), "architecture": a.arch,
                "file type": ft, "layers": a.n_layer, "embedding": a.n_embd, "experts": a.n_expert,
                "experts per token": a.n_expert_used, "context": self.model.n_ctx,
                "trained context": a.n_ctx_train, "vocabulary": a.n_vocab,
                "chat template": "fallback (User:/Assistant:)" if self.template.is_fallback else "from the model"}

    # --- conversation ----------------------------------------------------

    @property
    def n_cached(self) -> int:
        """Tokens of this conversation in the model's KV cache."""
        return len(self._cached)

    def context_messages(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.messages[self.start:]

    def reserve(self) -> int:
        """Context kept free for a reply: a quarter of it, less when replies are shorter."""
        n_ctx = self.model.n_ctx
        return max(1, min(n_ctx // 4, self.max_tokens if self.max_tokens >= 0 else n_ctx))

    def send(self, text: str) -> Reply:
        """Add a user message and return its Reply (generation runs while it is iterated).
        Raises ContextFullError, leaving the history as it was, when the prompt cannot fit."""
        if not isinstance(text, str):
            raise ChatError(f"a message must be a str, got {type(text).__name__}")
        text = clean_text(text)
        if not text.strip():
            raise ChatError("the message is empty")
        self._ready()
        if self.last is not None and self.last.running:  # it holds the model: end it here
            self.last.close()
        self.messages.append({"role": "user", "content": text})
        start = self.start
        try:
            tokens, dropped = self._fit()
        except BaseException:
            self.messages.pop()
            self.start = start
            raise
        self.last = Reply(self, tokens, dropped)
        return self.last

    def _fit(self) -> tuple[list[int], int]:
        limit = self.model.n_ctx - self.reserve()
        dropped = 0
        while True:
            tokens = prompt_tokens(self.tokenizer, self.template, self.context_messages())
            if len(tokens) <= limit:
                return tokens, dropped
            if self.start >= len(self.messages) - 1:
                raise ContextFullError(
                    f"this message needs a {len(tokens)}-token prompt"
                    f"{' with the system prompt' if self.system else ''}, but the context holds "
                    f"{self.model.n_ctx} tokens and keeps {self.reserve()} free for the reply: "
                    f"shorten it or restart with a larger --ctx")
            # drop the oldest message, then up to the next user message (roles keep alternating)
            self.start += 1
            dropped += 1
            while self.start < len(self.messages) - 1 and self.messages[self.start]["role"] != "user":
                self.start += 1
                dropped += 1

    def _generate(self, reply: Reply, tokens: list[int]):
        """Runs holding the model's lock (Reply)."""
        m, tok = self.model, self.tokenizer
        from localmoe.tokenizer import Detokenizer
        if getattr(m, "cache_user", self) is not self:  # someone else used the model since our last turn
            self._cached = []
            m.reset()
        reply.n_reused = keep = reuse_prefix(m, self._cached, tokens)
        detok = Detokenizer(tok)
        stops = StopStrings(self._stops)
        counts0 = m.store.counts.copy()
        pieces: list[str] = []
        try:
            new = tokens[keep:]
            t0 = time.perf_counter()
            logits = self._forward(new)
            reply.n_prompt, reply.t_prompt = len(new), time.perf_counter() - t0
            while True:
                if 0 <= self.max_tokens <= reply.n_decode:
                    reply.stop_reason = "length"
                    break
                t = self.sampler.sample(logits, self._cached)
                if tok.is_eog(t):
                    reply.stop_reason = "end"
                    break
                text, stopped = stops.feed(detok.feed(t))
                if text:
                    pieces.append(text)
                    yield text
                if stopped:
                    reply.stop_reason = "end"
                    break
                if len(self._cached) >= m.n_ctx:
                    reply.stop_reason = "context"
                    break
                t0 = time.perf_counter()
                logits = self._forward([t])
                reply.n_decode += 1
                reply.t_decode += time.perf_counter() - t0
            if not stops.stopped:
                text, _ = stops.feed(detok.flush())
                text += stops.flush()
                if text:
                    pieces.append(text)
                    yield text
        finally:
            if reply.stop_reason is None:
                reply.stop_reason = "interrupted"
            reply.text = "".join(pieces)
            reply.expert_hits = m.store.counts - counts0
            self.messages.append({"role": "assistant", "content": reply.text})
            self._truncate(m.cache.n_past)  # an interrupted forward may have stored less
            m.cache_user = self

    @functools.cached_property
    def _stops(self) -> list[str]:
        """reply_stops, rendered once: the template and tokenizer are fixed for the session."""
        return reply_stops(self.template, self.tokenizer)

    def _forward(self, new: list[int]) -> np.ndarray:
        """Evaluate new tokens after the cache; the last one's logits f32[n_vocab]."""
        self._cached += new
        logits = self.model.forward(new, all_logits=False)[-1]
        self.model.cache_user = self
        return logits

    def _truncate(self, n: int) -> None:
        del self._cached[n:]
        self.model.cache.truncate(n)

    # --- warm-up: compile/load the kernels while the user types ---------------

    def warm_up_async(self) -> None:
        def run():
            try:
                with self.model._lock.held():  # one unit: another user never sees its cache state
                    try:
                        self.model.forward(self.tokenizer.encode("Hi there", add_special=False)[:2] or [0])
                        self.model.forward([0])
                    finally:
                        self.model.reset()
            except BaseException as e:  # re-raised by the first turn
                self._warm_error = e
        self._warm = threading.Thread(target=run, name="localmoe-warm-up", daemon=True)
        self._warm.start()

    def close(self) -> None:
        """Close the model (Model.close), after any warm-up still running on it."""
        if self._warm is not None:
            self._warm.join()
        self.model.close()

    def _ready(self) -> None:
        if self._warm is not None:
            self._warm.join()
            self._warm, err, self._warm_error = None, self._warm_error, None
            if err is not None:
                raise err

    # --- save / load -----------------------------------------------------

    def to_json(self) -> dict:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return {"format": FORMAT, "version": VERSION, "messages": sys_msg + self.messages,
                "options": {**self.params, "max_tokens": self.max_tokens}}

    def save(self, path) -> None:
        """Write the conversation as JSON atomically (temp file, fsync, rename)."""
        path = Path(path).expanduser()
        data = json.dumps(self.to_json(), ensure_ascii=False, indent=1).encode()
        try:
            write_atomic(path, data)
        except OSError as e:
            raise ChatError(f"cannot save to {path}: {e.strerror}") from None

    def load(self, path) -> None:
        """Replace the conversation (and sampling options) with a saved one; validates it first."""
        path = Path(path).expanduser()
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise ChatError(f"{path} is larger than {MAX_FILE_BYTES >> 20} MiB: not a saved chat")
            raw = path.read_bytes()
        except OSError as e:
            raise ChatError(f"cannot read {path}: {e.strerror}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, or an integer of > 4300 digits
            raise ChatError(f"{path} is not valid JSON: {e}") from None
        except RecursionError:
            raise ChatError(f"{path} is nested too deeply: not a saved chat") from None
        system, messages, options = parse_saved(data, str(path))
        params = {k: options[k] for k in SAMPLING if k in options}
        try:
            self.set_params(**params)  # validates before changing anything
        except SamplingError as e:
            raise ChatError(f"{path}: bad options: {e}") from None
        if "max_tokens" in options:
            self.max_tokens = options["max_tokens"]
        self.system, self.messages, self.start, self.last = system, messages, 0, None


def parse_saved(data, where: str) -> tuple[str | None, list[dict], dict]:
    """(system, user/assistant messages, options) of a saved chat, or ChatError naming the problem."""
    def bad(why: str):
        return ChatError(f"{where} is not a localmoe chat file: {why}")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f'expected a JSON object with "format": "{FORMAT}"')
    if data.get("version") != VERSION:
        raise bad(f"unsupported version {data.get('version')!r} (this localmoe reads version {VERSION})")
    msgs = data.get("messages")
    if not isinstance(msgs, list):
        raise bad('"messages" must be a list')
    system, out = None, []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise bad(f"message {i} must be an object with a string \"content\"")
        role, content = msg.get("role"), clean_text(msg["content"])
        if role == "system" and i == 0:
            system = content or None
        elif role in ("user", "assistant"):
            out.append({"role": role, "content": content})
        else:
            raise bad(f"message {i} has role {role!r} (expected user or assistant"
                      f"{', or system first' if i == 0 else ''})")
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise bad('"options" must be an object')
    mt = options.get("max_tokens", -1)
    if not isinstance(mt, int) or isinstance(mt, bool):
        raise bad('"options.max_tokens" must be an integer')
    for k in SAMPLING:
        v = options.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad(f'"options.{k}" must be a number')
    return system, out, options


# --- stats -------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident memory now (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

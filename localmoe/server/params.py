"""Request validation: JSON bodies to GenRequests, or an ApiError (400) naming the field.

A parameter we do not honour is refused, never ignored: one that only has a default we
support (n=1, logprobs=false, ...) is accepted at that default.
"""
from __future__ import annotations

import json
import math

from .engine import ApiError, GenRequest

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 16


def parse_body(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, or an integer of > 4300 digits
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def _bad(param: str, why: str) -> ApiError:
    return ApiError(400, f"'{param}' {why}", code="invalid_value", param=param)


def number(d: dict, key: str, kind=float, name: str | None = None):
    """d[key] as kind (float or int), None when absent; a wrong type is a 400."""
    v = d.get(key)
    name = name or key
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"must be {'an integer' if kind is int else 'a number'}, got {json.dumps(v)[:40]}")
    if kind is int and (isinstance(v, float) and not v.is_integer()):
        raise _bad(name, f"must be an integer, got {v}")
    if isinstance(v, float) and not math.isfinite(v):
        raise _bad(name, "must be finite")
    return kind(v)


def boolean(d: dict, key: str, default: bool, name: str | None = None) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name or key, f"must be true or false, got {json.dumps(v)[:40]}")
    return v


def stops(v, name: str = "stop") -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _bad(name, "must be a string or a list of strings")
    if len(v) > MAX_STOPS:
        raise _bad(name, f"may hold at most {MAX_STOPS} strings")
    return v


def sampling(d: dict, defaults: dict, names: dict[str, str], prefix: str = "") -> dict:
    """Sampler kwargs: defaults overridden by d's fields (names: Sampler name -> field name)."""
    out = dict(defaults)
    for key, field in names.items():
        v = number(d, field, int if key in ("top_k", "seed", "repeat_last_n") else float, prefix + field)
        if v is not None:
            out[key] = v
    from localmoe.sampling import Sampler, SamplingError
    try:
        Sampler(**out)
    except SamplingError as e:
        raise ApiError(400, str(e), code="invalid_value") from None
    return out


def check_unsupported(d: dict, allowed: set[str], defaults_only: dict) -> None:
    """400 for a field we do not know, or one set to something other than what we do."""
    for key, v in d.items():
        if key in allowed:
            continue
        if key in defaults_only:
            if v is None or v in defaults_only[key]:
                continue
            raise ApiError(400, f"unsupported parameter '{key}' = {json.dumps(v)[:80]}: localmoe serve does not "
                                f"support it", code="unsupported_parameter", param=key)
        raise ApiError(400, f"unknown parameter '{key}'", code="unsupported_parameter", param=key)


def messages(v, where: str = "messages", ollama: bool = False) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise _bad(where, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(v):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise _bad(at, "must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES or (ollama and role == "developer"):
            raise ApiError(400, f"{at}.role: unknown role {json.dumps(role)[:40]} (expected system, user or "
                                "assistant)", code="invalid_value", param=f"{at}.role")
        extra = set(m) - {"role", "content", "name", "reasoning_content", "thinking", "images", "tool_calls"}
        for key in sorted(extra | {k for k in ("tool_calls", "images") if m.get(k)}):
            raise ApiError(400, f"{at}.{key} is not supported", code="unsupported_parameter", param=f"{at}.{key}")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list) and not ollama:  # OpenAI content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{at}.content[{j}]: only text parts are supported",
                                   code="unsupported_parameter", param=f"{at}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise _bad(f"{at}.content", "must be a string")
        msg = {"role": ROLES[role], "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


# --- OpenAI ------------------------------------------------------------------

OPENAI_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repeat_penalty": "repeat_penalty", "seed": "seed"}
OPENAI_DEFAULTS_ONLY = {"n": (1,), "logprobs": (False,), "top_logprobs": (0,), "tools": ([],),
                        "tool_choice": ("none", "auto"), "presence_penalty": (0, 0.0),
                        "frequency_penalty": (0, 0.0), "logit_bias": ({},), "parallel_tool_calls": (True, False),
                        "response_format": ({"type": "text"},), "best_of": (1,), "echo": (False,),
                        "suffix": ("",), "functions": ([],), "function_call": ("none",)}
COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed",
          "top_k", "min_p", "repeat_penalty", "user", "cache_prompt"}


def openai_request(d: dict, defaults: dict, chat: bool) -> tuple[GenRequest, bool, bool]:
    """(request, stream, include_usage) of a /v1/chat/completions or /v1/completions body."""
    allowed = COMMON | ({"messages", "max_completion_tokens", "reasoning_format"} if chat else {"prompt"})
    check_unsupported(d, allowed, OPENAI_DEFAULTS_ONLY)
    stream = boolean(d, "stream", False)
    so = d.get("stream_options")
    if so is not None and (not isinstance(so, dict) or set(so) - {"include_usage"}):
        raise _bad("stream_options", "supports only {\"include_usage\": bool}")
    include_usage = boolean(so or {}, "include_usage", False, "stream_options.include_usage")
    max_tokens = number(d, "max_completion_tokens", int) if chat else None
    if max_tokens is None:
        max_tokens = number(d, "max_tokens", int)
    if max_tokens is not None and max_tokens < 1:
        raise _bad("max_tokens", "must be at least 1")
    req = GenRequest(sampling=sampling(d, defaults, OPENAI_SAMPLING), stop=stops(d.get("stop")),
                     max_tokens=-1 if max_tokens is None else max_tokens,
                     cache_prompt=boolean(d, "cache_prompt", True))
    if chat:
        req.messages = messages(d.get("messages"))
        rf = d.get("reasoning_format")
        if rf not in (None, "none", "deepseek"):
            raise _bad("reasoning_format", "must be \"none\" or \"deepseek\"")
        req.split_reasoning = rf != "none"
    else:
        p = d.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            req.prompt = p
        elif isinstance(p, str):
            req.prompt = p
        else:
            raise _bad("prompt", "must be a string, a list of one string, or a list of token ids")
    return req, stream, include_usage


# --- Ollama ------------------------------------------------------------------

OLLAMA_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repeat_penalty": "repeat_penalty", "seed": "seed", "repeat_last_n": "repeat_last_n"}
# load-time settings Ollama accepts per request: fixed here by the server's own options
OLLAMA_RUNTIME = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock",
                  "numa", "low_vram", "num_keep"}


def ollama_request(d: dict, defaults: dict, chat: bool) -> tuple[GenRequest, bool]:
    """(request, stream) of an /api/chat or /api/generate body (Ollama streams by default)."""
    allowed = {"model", "stream", "options", "keep_alive", "think"}
    allowed |= {"messages"} if chat else {"prompt", "system", "raw"}
    check_unsupported(d, allowed, {"format": ("",), "tools": ([],), "images": ([],), "template": ("",),
                                   "context": ([],), "suffix": ("",)})
    opts = d.get("options") or {}
    if not isinstance(opts, dict):
        raise _bad("options", "must be an object")
    known = set(OLLAMA_SAMPLING.values()) | OLLAMA_RUNTIME | {"num_predict", "stop"}
    for key in opts:
        if key not in known:
            raise ApiError(400, f"unsupported option 'options.{key}'", code="unsupported_parameter",
                           param=f"options.{key}")
    n = number(opts, "num_predict", int, "options.num_predict")
    think = d.get("think")
    if think is not None and not isinstance(think, bool):
        raise _bad("think", "must be true or false")
    req = GenRequest(sampling=sampling(opts, defaults, OLLAMA_SAMPLING, "options."),
                     stop=stops(opts.get("stop"), "options.stop"),
                     max_tokens=-1 if n is None or n < 0 else n, split_reasoning=think is not False)
    if chat:
        req.messages = messages(d.get("messages"), ollama=True)
    else:
        prompt, system = d.get("prompt", ""), d.get("system")
        if not isinstance(prompt, str):
            raise _bad("prompt", "must be a string")
        if system is not None and not isinstance(system, str):
            raise _bad("system", "must be a string")
        if boolean(d, "raw", False):
            if system:
                raise _bad("system", "cannot be used with raw")
            req.prompt = prompt
        else:
            req.messages = ([{"role": "system", "content": system}] if system else []) + \
                           [{"role": "user", "content": prompt}]
    return req, boolean(d, "stream", True)

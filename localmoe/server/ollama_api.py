"""Ollama-compatible routes: /api/chat and /api/generate (NDJSON when streaming), and the
model listings /api/tags, /api/ps, /api/show, /api/version."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os

from starlette.requests import Request
from starlette.responses import JSONResponse

import localmoe
from .common import JobStream, collect, read_json, started
from .engine import ApiError
from .info import model_facts
from .params import ollama_request

DONE = {"stop": "stop", "length": "length", "cancelled": "stop"}


def _created_at() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _stats(stats: dict) -> dict:
    ns = 1_000_000  # ms -> ns
    return {"done_reason": DONE[stats["finish_reason"]], "total_duration": int(stats["total_ms"] * ns),
            "load_duration": int(stats["load_ms"] * ns), "prompt_eval_count": stats["prompt_n"],
            "prompt_eval_duration": int(stats["prompt_ms"] * ns), "eval_count": stats["completion_tokens"],
            "eval_duration": int(stats["predicted_ms"] * ns)}


async def _handle(request: Request, chat: bool):
    engine = request.app.state.engine
    body = await read_json(request)
    req, stream = ollama_request(body, request.app.state.sampling, chat)
    req.model = engine.resolve(body.get("model"))
    name = body.get("model") or (engine.loaded.name if engine.loaded else "")
    if not chat and req.messages is not None and not req.messages[-1]["content"]:
        # an empty prompt asks Ollama to load the model and reply with nothing
        return JSONResponse({"model": name, "created_at": _created_at(), "response": "", "done": True,
                             "done_reason": "load"})
    job = engine.submit(req, "ollama")
    await started(job, request)

    def piece(content: str, reasoning: str) -> dict:
        if chat:
            msg = {"role": "assistant", "content": content}
            if reasoning:
                msg["thinking"] = reasoning
            return {"message": msg}
        out = {"response": content}
        if reasoning:
            out["thinking"] = reasoning
        return out

    if not stream:
        content, reasoning, stats = await collect(job, request)
        return JSONResponse({"model": name, "created_at": _created_at(), **piece(content, reasoning),
                             "done": True, **_stats(stats)})

    def line(obj: dict) -> bytes:
        return json.dumps({"model": name, "created_at": _created_at(), **obj}, ensure_ascii=False).encode() + b"\n"

    async def events():
        while True:
            ev = await job.events.get()
            if ev[0] == "delta":
                yield line({**piece(ev[1], ev[2]), "done": False})
            elif ev[0] == "done":
                yield line({**piece("", ""), "done": True, **_stats(ev[1])})
                break
            elif ev[0] == "error":
                yield json.dumps({"error": ev[1].message}).encode() + b"\n"
                break

    return JobStream(events(), job, "application/x-ndjson")


async def chat(request: Request):
    return await _handle(request, chat=True)


async def generate(request: Request):
    return await _handle(request, chat=False)


async def version(request: Request):
    return JSONResponse({"version": localmoe.__version__})


def _entry(name: str, path: str, facts: dict | None) -> dict:
    st = os.stat(path)
    digest = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    details = {"parent_model": "", "format": "gguf", "family": "", "families": [],
               "parameter_size": "", "quantization_level": ""}
    if facts:
        details.update(family=facts["arch"], families=[facts["arch"]], quantization_level=facts["quant"] or "",
                       parameter_size=_size(facts["n_params"]))
    return {"name": name, "model": name, "size": st.st_size, "digest": digest, "details": details,
            "modified_at": dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc).isoformat()}


def _size(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


async def tags(request: Request):
    engine = request.app.state.engine
    loaded = engine.loaded
    out = []
    for name, path in engine.models().items():
        facts = model_facts(engine) if loaded is not None and loaded.path == path else None
        try:
            out.append(_entry(name, path, facts))
        except OSError:
            continue
    return JSONResponse({"models": out})


async def ps(request: Request):
    engine = request.app.state.engine
    loaded = engine.loaded
    if loaded is None:
        return JSONResponse({"models": []})
    e = _entry(loaded.name, loaded.path, model_facts(engine))
    e.update(expires_at="9999-12-31T23:59:59Z", size_vram=0)
    return JSONResponse({"models": [e]})


async def show(request: Request):
    engine = request.app.state.engine
    body = await read_json(request)
    name = body.get("model") or body.get("name")
    path = engine.resolve(name)
    loaded = engine.loaded
    if loaded is None:
        raise ApiError(503, "the model is loading", code="loading")
    if path is not None and path != loaded.path:
        entry = _entry(name, path, None)
        return JSONResponse({"modelfile": "", "parameters": "", "template": "", "details": entry["details"],
                             "model_info": {}, "capabilities": ["completion"], "modified_at": entry["modified_at"]})
    facts = model_facts(engine)
    entry = _entry(loaded.name, loaded.path, facts)
    s = request.app.state.sampling
    params = "\n".join(f"{k} {v}" for k, v in s.items() if v is not None)
    a = loaded.model.args
    info = {"general.architecture": a.arch, "general.parameter_count": facts["n_params"],
            f"{a.arch}.context_length": a.n_ctx_train, f"{a.arch}.block_count": a.n_layer,
            f"{a.arch}.embedding_length": a.n_embd, f"{a.arch}.expert_count": a.n_expert,
            f"{a.arch}.expert_used_count": a.n_expert_used}
    template = loaded.template.source if loaded.template is not None else ""
    return JSONResponse({"modelfile": "", "parameters": params, "template": template,
                         "details": entry["details"], "model_info": info, "capabilities": ["completion"],
                         "modified_at": entry["modified_at"]})

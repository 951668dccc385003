"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions (SSE when streaming), /v1/models."""
from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse

from .common import JobStream, collect, now, read_json, started, timings
from .engine import ApiError
from .params import openai_request

FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def _usage(stats: dict) -> dict:
    return {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
            "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": stats["cached_tokens"]}}


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _handle(request: Request, chat: bool):
    engine = request.app.state.engine
    body = await read_json(request)
    req, stream, include_usage = openai_request(body, request.app.state.sampling, chat)
    req.model = engine.resolve(body.get("model"))
    job = engine.submit(req, "chatcmpl" if chat else "cmpl")
    info = await started(job, request)
    obj = "chat.completion" if chat else "text_completion"
    head = {"id": job.id, "object": obj, "created": now(), "model": info["model"]}
    if not stream:
        content, reasoning, stats = await collect(job, request)
        if chat:
            msg = {"role": "assistant", "content": content}
            if reasoning:
                msg["reasoning_content"] = reasoning
            choice = {"index": 0, "message": msg, "logprobs": None}
        else:
            choice = {"index": 0, "text": content, "logprobs": None}
        choice["finish_reason"] = FINISH[stats["finish_reason"]]
        return JSONResponse({**head, "choices": [choice], "usage": _usage(stats), "timings": timings(stats)})

    chunk_head = dict(head, object="chat.completion.chunk" if chat else "text_completion")

    def chunk(delta: dict | None = None, text: str = "", finish=None, **extra) -> bytes:
        choice = ({"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return _sse({**chunk_head, "choices": [choice], **extra})

    async def events():
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        while True:
            ev = await job.events.get()
            if ev[0] == "delta":
                c, r = ev[1], ev[2]
                if chat:
                    yield chunk({**({"content": c} if c else {}), **({"reasoning_content": r} if r else {})})
                else:
                    yield chunk(text=c + r)
            elif ev[0] == "done":
                stats = ev[1]
                yield chunk(finish=FINISH[stats["finish_reason"]], timings=timings(stats))
                if include_usage:
                    yield _sse({**chunk_head, "choices": [], "usage": _usage(stats), "timings": timings(stats)})
                break
            elif ev[0] == "error":  # after the headers: an error event in the stream, as OpenAI does
                e: ApiError = ev[1]
                yield _sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
                break
        yield b"data: [DONE]\n\n"

    return JobStream(events(), job, "text/event-stream")


async def chat_completions(request: Request):
    return await _handle(request, chat=True)


async def completions(request: Request):
    return await _handle(request, chat=False)


async def models(request: Request):
    engine = request.app.state.engine
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": now(), "owned_by": "localmoe"}
        for name in engine.models()]})

"""What the route modules share: the body limit, error bodies, and reading a Job's events."""
from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from .engine import ApiError, Job
from .params import parse_body

POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


def is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_response(e: ApiError, path: str) -> JSONResponse:
    """OpenAI's error shape, or Ollama's {"error": "..."} on /api/ routes."""
    body = ({"error": e.message} if is_ollama(path) else
            {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
    return JSONResponse(body, status_code=e.status, headers=e.headers)


async def read_json(request: Request) -> dict:
    """The JSON object body; 413 as soon as more than the app's max_body bytes arrive."""
    limit = request.app.state.max_body
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"the request body is larger than the limit of {limit} bytes (--max-body)",
                       code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_big
        chunks.append(chunk)
    return parse_body(b"".join(chunks))


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


async def next_event(job: Job, request: Request | None = None) -> tuple:
    """The job's next event; with `request`, cancels the job if its client disconnects meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), POLL_S if request is not None else None)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone() from None


async def started(job: Job, request: Request) -> dict:
    """Wait for the job's turn: its start info, or its error raised (before any response is sent)."""
    try:
        ev = await next_event(job, request)
    except BaseException:
        job.cancel()
        raise
    if ev[0] == "error":
        raise ev[1]
    return ev[1]


async def collect(job: Job, request: Request) -> tuple[str, str, dict]:
    """(content, reasoning, stats) of a non-streaming request."""
    content, reasoning = [], []
    try:
        while True:
            ev = await next_event(job, request)
            if ev[0] == "delta":
                content.append(ev[1])
                reasoning.append(ev[2])
            elif ev[0] == "done":
                return "".join(content), "".join(reasoning), ev[1]
            elif ev[0] == "error":
                raise ev[1]
    finally:
        job.cancel()  # a no-op once done; otherwise the worker stops at its next token


class JobStream(StreamingResponse):
    """A streaming response that cancels its job however it ends (client gone, send failed)."""

    def __init__(self, content, job: Job, media_type: str):
        super().__init__(content, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def timings(stats: dict) -> dict:
    """llama-server's timings object."""
    pn, pms, dn, dms = stats["prompt_n"], stats["prompt_ms"], stats["completion_tokens"], stats["predicted_ms"]
    return {"prompt_n": pn, "prompt_ms": pms, "prompt_per_second": pn / pms * 1e3 if pms > 0 else None,
            "predicted_n": dn, "predicted_ms": dms, "predicted_per_second": dn / dms * 1e3 if dms > 0 else None,
            "cache_n": stats["cached_tokens"]}


def now() -> int:
    return int(time.time())

"""The Starlette app: routes, API-key check, CORS, error bodies; the model lives in an Engine."""
from __future__ import annotations

import hmac
import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import ollama_api, openai_api
from .common import ClientGone, error_response, read_json
from .engine import ApiError, Engine

STATIC = Path(__file__).parent / "static"
PUBLIC = ("/health",)  # and the page itself: / and /static/
log = logging.getLogger("localmoe.server")


class ApiKeyMiddleware:
    """Every route but the page and /health needs `Authorization: Bearer KEY`."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path == "/" or path.startswith("/static/") or path in PUBLIC:
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(got, self.key):
            e = ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                         code="invalid_api_key", type_="authentication_error")
            return await error_response(e, path)(scope, receive, send)
        return await self.app(scope, receive, send)


def _loaded(request: Request):
    L = request.app.state.engine.loaded
    if L is None:
        raise ApiError(503, "the model is loading", code="loading", headers={"Retry-After": "2"})
    return L


async def health(request: Request):
    engine: Engine = request.app.state.engine
    if engine.state == "ok" and engine.loaded is not None:
        return JSONResponse({"status": "ok"})
    if engine.state == "error":
        return JSONResponse({"status": "error", "error": engine.error}, status_code=500)
    return JSONResponse({"status": "loading", "error": {"code": 503, "message": "Loading model",
                                                        "type": "unavailable_error"}}, status_code=503)


async def props(request: Request):
    L = _loaded(request)
    f = L.facts
    return JSONResponse({"model": Path(L.path).name, **{k: f[k] for k in (
        "arch", "n_params", "quant", "n_layer", "n_expert", "n_expert_used", "n_ctx", "n_ctx_train",
        "ram_budget", "has_chat_template")},
        "reasoning_format": "deepseek" if request.app.state.engine.reasoning else "none",
        "default_sampling": {k: v for k, v in request.app.state.sampling.items() if k != "seed"},
        "n_waiting": request.app.state.engine.n_waiting, "max_queue": request.app.state.engine.max_queue,
        "n_running": request.app.state.engine.n_running, "n_parallel": request.app.state.engine.n_parallel})


async def experts(request: Request):
    out = request.app.state.engine.expert_counts(request.query_params.get("id"))
    if out is None:
        raise ApiError(503, "the model is loading", code="loading")
    return JSONResponse(out)


async def tokenize(request: Request):
    body = await read_json(request)
    content = body.get("content")
    if not isinstance(content, str):
        raise ApiError(400, "'content' must be a string", param="content")
    for k in ("add_special", "with_pieces", "parse_special"):
        if not isinstance(body.get(k, False), bool):
            raise ApiError(400, f"'{k}' must be true or false", param=k)
    tok = _loaded(request).tokenizer
    ids = tok.encode(content, add_special=body.get("add_special", False), special=body.get("parse_special", False))
    if body.get("with_pieces", False):
        return JSONResponse({"tokens": [{"id": t, "piece": tok.token_to_piece(t).decode("utf-8", "replace")}
                                        for t in ids]})
    return JSONResponse({"tokens": ids})


async def detokenize(request: Request):
    body = await read_json(request)
    ids = body.get("tokens")
    L = _loaded(request)
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ApiError(400, "'tokens' must be a list of token ids", param="tokens")
    bad = [t for t in ids if not 0 <= t < L.model.n_vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{L.model.n_vocab - 1})", param="tokens")
    return JSONResponse({"content": L.tokenizer.decode(ids)})


async def index(request: Request):
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _api_error(request: Request, e: ApiError):
    return error_response(e, request.url.path)


async def _http_error(request: Request, e: HTTPException):
    msg = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(ApiError(e.status_code, msg.get(e.status_code, str(e.detail)),
                                   code="not_found" if e.status_code == 404 else None), request.url.path)


async def _client_gone(request: Request, e: ClientGone):
    return Response(status_code=499)


async def _internal(request: Request, e: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"), request.url.path)


def create_app(engine: Engine, sampling: dict, api_key: str | None = None, max_body: int = 4 << 20,
               cors_origins=()) -> Starlette:
    """The app around a started (or starting) Engine. sampling: the default Sampler kwargs."""
    routes = [
        Route("/", index), Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/health", health), Route("/props", props), Route("/v1/experts", experts),
        Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
        Route("/v1/models", openai_api.models), Route("/models", openai_api.models),
        Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/v1/completions", openai_api.completions, methods=["POST"]),
        Route("/completions", openai_api.completions, methods=["POST"]),
        Route("/api/version", ollama_api.version), Route("/api/tags", ollama_api.tags),
        Route("/api/ps", ollama_api.ps), Route("/api/show", ollama_api.show, methods=["POST"]),
        Route("/api/chat", ollama_api.chat, methods=["POST"]),
        Route("/api/generate", ollama_api.generate, methods=["POST"]),
    ]
    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins),
                                     allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"]))
    if api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=api_key))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, ClientGone: _client_gone, Exception: _internal})
    app.state.engine, app.state.sampling, app.state.max_body = engine, dict(sampling), max_body
    return app


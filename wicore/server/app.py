"""The FastAPI app: OpenAI-compatible endpoints over an ``EngineLoop``.

``/v1/chat/completions`` and ``/v1/completions`` (streamed as server-sent events
in OpenAI's chunk format ending with ``data: [DONE]``, or whole), ``/v1/models``,
``/health``, ``/status`` and ``/metrics``. Every error is OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad
input (validation errors are 400, as OpenAI answers, not FastAPI's 422).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from wicore.server.chat_template import TemplateError, render
from wicore.server.engine_loop import EngineLoop, Handle, QueueFull
from wicore.server.guard import Guard
from wicore.server.metrics import CONTENT_TYPE, ServerMetrics
from wicore.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    error_json,
)
from wicore.server.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger("wicore.server")
ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (400, 401, 404, 408, 413, 429)}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
         429: "rate_limit_error", 503: "service_unavailable"}


@dataclass
class ServerConfig:
    model_name: str
    context_len: int
    vocab_size: int
    family: str = "gemma3"
    backend: str = "torch"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 1024
    request_timeout_s: float = 600.0
    policy: dict[str, Any] = field(default_factory=dict)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _err(status: int, message: str, param: str | None = None, code: str | None = None,
         headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_json(message, TYPES.get(status, "invalid_request_error"), param, code),
                        status_code=status, headers=headers)


def create_app(loop: EngineLoop, tok: Tokenizer, cfg: ServerConfig) -> FastAPI:
    metrics = ServerMetrics(lambda: loop.snapshot)
    created = int(time.time())

    def on_finish(h: Handle, seq: Any) -> None:  # engine thread
        metrics.requests.labels(outcome="stop" if h.stop_hit else h.finish_reason.split(":")[0]).inc()

    loop.on_finish = on_finish
    app = FastAPI(title="WiCore OpenAI-compatible server", version="0.1.0")
    app.state.loop, app.state.cfg, app.state.metrics = loop, cfg, metrics
    app.add_middleware(Guard, max_body_bytes=cfg.max_body_bytes, api_key=cfg.api_key,
                       on_error=lambda code: metrics.http_errors.labels(code=str(code)).inc())

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return _err(400, "We could not parse the JSON body of your request.", None, "invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return _err(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _err(exc.status_code, str(exc.detail), None, None)

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return _err(exc.status, exc.message, exc.param, exc.code, headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _err(500, f"internal error: {type(exc).__name__}", None, "internal_error")

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The schema, with ``model`` restricted to the one served model (what the server accepts)."""
        if app.openapi_schema is None:
            schema = base_openapi()
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                props = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
                if "model" in props:
                    props["model"] = {**props["model"], "enum": [cfg.model_name], "examples": [cfg.model_name]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # ----- info endpoints ----------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        if not loop.alive:
            return JSONResponse({"status": "error", "ready": False, "error": loop.error}, status_code=503)
        return JSONResponse({"status": "ok", "ready": True})

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return {"model": cfg.model_name, "backend": cfg.backend, "policy": cfg.policy,
                "max_num_seqs": loop.max_running, "max_queue": loop.max_queue, "context_len": cfg.context_len,
                **loop.snapshot}

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def card() -> ModelCard:
        return ModelCard(id=cfg.model_name, created=created, max_model_len=cfg.context_len)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERRORS)
    async def model(model_id: str) -> ModelCard:
        if model_id != cfg.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
        return card()

    # ----- generation ----------------------------------------------------------------
    def check_model(name: str) -> None:
        if name != cfg.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{cfg.model_name}'",
                           "model", "model_not_found")

    def with_bos(ids: list[int]) -> list[int]:
        return ([tok.bos_id] + ids) if tok.bos_id is not None else ids

    def submit(body: ChatCompletionRequest | CompletionRequest, prompt: list[int],
               max_tokens: int | None, default_max: int) -> Handle:
        n = len(prompt)
        if n == 0:
            raise APIError(400, "the prompt is empty", "prompt", "invalid_value")
        room = cfg.context_len - n
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {cfg.context_len} tokens; your prompt "
                           f"has {n} tokens", "messages", "context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max, room)
        elif max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {cfg.context_len} tokens; you asked "
                           f"for {n} prompt + {max_tokens} completion tokens", "max_tokens",
                           "context_length_exceeded")
        sampling: dict[str, float | int] = {
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": body.top_k}
        stop_ids = () if body.ignore_eos else tok.stop_ids
        timeout = body.timeout if body.timeout is not None else cfg.request_timeout_s
        try:
            h = loop.submit(prompt, max_tokens, sampling, stop_ids, body.priority, timeout)
        except QueueFull as e:
            raise APIError(429, str(e), None, "rate_limit_exceeded") from None
        metrics.prompt_tokens.inc(n)
        return h

    async def events(h: Handle, request: Request, stops: list[str]) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish reason or None); cancels the engine request if the client goes away."""
        dec = StreamDecoder(tok)
        hold = max((len(s) for s in stops), default=1) - 1
        text, sent, done = "", 0, False
        first = last = 0.0
        ntok = 0
        try:
            while True:
                try:
                    kind, val = await asyncio.wait_for(h.queue.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "tokens":
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    ntok += len(val)
                    h.received = ntok
                    metrics.tokens(len(val))
                    ids = [i for i in val if i not in h.stop_ids]
                    text += dec.push(ids)
                    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        done = h.stop_hit = True
                        loop.cancel(h.request_id)
                        yield text[sent:cut], "stop"
                        _observe(metrics, h, first, last, ntok, "stop")
                        return
                    upto = max(sent, len(text) - hold)
                    if upto > sent:
                        yield text[sent:upto], None
                        sent = upto
                    continue
                done = True
                text += dec.push([], final=True)
                _observe(metrics, h, first, last, ntok, val)
                yield text[sent:], val
                return
        finally:
            if not done:
                loop.cancel(h.request_id)

    def usage(h: Handle) -> dict[str, int]:
        c = h.received
        return {"prompt_tokens": len(h.prompt_ids), "completion_tokens": c,
                "total_tokens": len(h.prompt_ids) + c}

    async def whole(h: Handle, request: Request, stops: list[str]) -> tuple[str, str]:
        parts: list[str] = []
        reason = "cancelled"
        async for delta, fin in events(h, request, stops):
            parts.append(delta)
            if fin is not None:
                reason = fin
        if reason == "timeout":
            raise APIError(408, "the request did not finish within its timeout", "timeout", "request_timeout")
        if reason.startswith("error:"):
            why = reason[6:]
            if why == "engine_failed":
                raise APIError(503, "the engine stopped; see /health", None, "engine_failed")
            raise APIError(400, f"the request cannot be served: {why}", None, why)
        return "".join(parts), reason

    def sse(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    async def stream(h: Handle, request: Request, stops: list[str], chat: bool, include_usage: bool,
                     rid: str) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        base: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()), "model": cfg.model_name}
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: str | None, fin: str | None, role: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {"content": delta} if delta else {})
                choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": fin, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": fin, "logprobs": None}
            return sse({**base, "choices": [choice], **extra})

        if chat:
            yield chunk(None, None, role=True)
        async for delta, fin in events(h, request, stops):
            if fin is None:
                yield chunk(delta, None)
                continue
            if fin == "timeout" or fin.startswith("error:"):
                if delta:
                    yield chunk(delta, None)
                code = "request_timeout" if fin == "timeout" else fin[6:]
                yield sse(error_json(f"request ended early: {code}", "timeout_error" if fin == "timeout"
                                     else "invalid_request_error", None, code))
            else:
                if delta:
                    yield chunk(delta, None)
                yield chunk(None, fin)
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(h)})
        yield "data: [DONE]\n\n"

    def respond(h: Handle, request: Request, body: ChatCompletionRequest | CompletionRequest,
                chat: bool) -> StreamingResponse:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        include = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream(h, request, body.stops(), chat, include, rid),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        try:
            text = render([(m.role, m.text()) for m in body.messages], cfg.family)
        except TemplateError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None
        h = submit(body, with_bos(tok.encode(text)), body.max_completion_tokens or body.max_tokens,
                   cfg.default_max_tokens)
        if body.stream:
            return respond(h, request, body, chat=True)
        out, reason = await whole(h, request, body.stops())
        return {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion", "created": int(time.time()),
                "model": cfg.model_name, "choices": [{"index": 0, "message": {"role": "assistant", "content": out},
                                                      "finish_reason": reason, "logprobs": None}],
                "usage": usage(h)}

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise APIError(400, "only one prompt per request is supported", "prompt", "invalid_value")
            p = p[0]
        if isinstance(p, str):
            ids = with_bos(tok.encode(p))
        else:
            ids = [int(i) for i in p]
            if any(not 0 <= i < cfg.vocab_size for i in ids):
                raise APIError(400, f"prompt token ids must be in [0, {cfg.vocab_size})", "prompt", "invalid_value")
        h = submit(body, ids, body.max_tokens, 16)  # OpenAI's default for completions
        if body.stream:
            return respond(h, request, body, chat=False)
        out, reason = await whole(h, request, body.stops())
        if body.echo and isinstance(p, str):
            out = p + out
        return {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
                "model": cfg.model_name, "choices": [{"index": 0, "text": out, "finish_reason": reason,
                                                      "logprobs": None}], "usage": usage(h)}

    return app


def _observe(metrics: ServerMetrics, h: Handle, first: float, last: float, ntok: int, reason: str) -> None:
    if reason not in ("stop", "length") or not first:
        return
    tpot = (last - first) / (ntok - 1) if ntok > 1 else None
    metrics.latency(first - h.submitted_at, tpot, last - h.submitted_at)

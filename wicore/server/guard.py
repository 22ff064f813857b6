"""ASGI middleware: request body size limit, optional Bearer API key, error counting.

The body is read (at most ``max_body_bytes``) before the app sees it, so an
oversized body is answered 413 whether or not it declared a Content-Length.
The API key protects ``/v1/*``; ``/health``, ``/status``, ``/metrics`` stay open
on the (default loopback) bind address, like vLLM's server.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from wicore.server.schemas import error_json

Scope = dict[str, Any]
Message = dict[str, Any]


class Guard:
    def __init__(self, app: Any, max_body_bytes: int, api_key: str | None = None,
                 on_error: Callable[[int], None] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key
        self.on_error = on_error

    async def _reply(self, send: Callable[[Message], Any], status: int, message: str, type_: str,
                     code: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        body = json.dumps(error_json(message, type_, None, code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
        await send({"type": "http.response.body", "body": body})
        if self.on_error is not None:
            self.on_error(status)

    async def __call__(self, scope: Scope, receive: Callable[[], Any], send: Callable[[Message], Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key and str(scope.get("path", "")).startswith("/v1"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                await self._reply(send, 401, "Incorrect API key provided (Authorization: Bearer <key>)",
                                  "authentication_error", "invalid_api_key",
                                  [(b"www-authenticate", b"Bearer")])
                return
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await self._reply(send, 400, "invalid Content-Length", "invalid_request_error", "invalid_value")
                return
            if size > self.max_body_bytes:
                await self._reply(send, 413, f"request body of {size} bytes exceeds the limit of "
                                  f"{self.max_body_bytes} bytes", "invalid_request_error", "request_too_large")
                return
        chunks: list[bytes] = []
        total = 0
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    return  # client went away before sending its body
                part = msg.get("body", b"")
                total += len(part)
                if total > self.max_body_bytes:
                    await self._reply(send, 413, f"request body exceeds the limit of {self.max_body_bytes} "
                                      "bytes", "invalid_request_error", "request_too_large")
                    return
                chunks.append(part)
                if not msg.get("more_body", False):
                    break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed and chunks:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            msg: Message = await receive()
            return msg

        async def counting_send(msg: Message) -> None:
            if msg["type"] == "http.response.start" and msg["status"] >= 400 and self.on_error is not None:
                self.on_error(int(msg["status"]))
            await send(msg)

        if chunks and not headers.get(b"content-type", b"").startswith(b"application/json"):
            # the API only takes JSON: parse any body as JSON (curl -d sends a form content type)
            hs = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
            scope = {**scope, "headers": [*hs, (b"content-type", b"application/json")]}
        await self.app(scope, replay if chunks else receive, counting_send)

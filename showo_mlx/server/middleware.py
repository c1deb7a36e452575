"""ASGI middleware: one log line per request, the request body limit and the API key."""

from __future__ import annotations

import hmac
import json
import time
from typing import Callable

from .errors import APIError

PUBLIC_PATHS = ("/", "/favicon.ico")  # the page itself; it asks for the key and sends it on every call
PUBLIC_PREFIXES = ("/static/",)


async def send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestLog:
    """`METHOD /path STATUS SECONDS` once the response has been sent (streams included)."""

    def __init__(self, app, log: Callable[[str], None]):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": None}

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        except Exception:
            status["code"] = status["code"] or 500  # answered by the app's 500 handler outside
            raise
        finally:
            code = status["code"] if status["code"] is not None else "-"
            self.log(f"{scope['method']} {scope['path']} {code} {time.perf_counter() - start:.2f}s")


class _TooLarge(APIError):
    """Raised from `receive`: the app's APIError handler answers 413 (or BodyLimit does)."""


class BodyLimit:
    """413 for a body over `max_bytes`, from Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> APIError:
        return APIError(413, f"the request body is over the server's limit of {self.max_bytes} bytes (--max-body-mb)", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, self._error())
        seen = {"bytes": 0, "started": False}

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > self.max_bytes:
                    raise _TooLarge(413, self._error().message, code="request_too_large")
            return message

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                seen["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge as e:
            if not seen["started"]:
                await send_error(send, e)


class APIKey:
    """`Authorization: Bearer <key>` on every endpoint but the page's static files."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key or _public(scope["path"]):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
            message = "missing API key: send 'Authorization: Bearer <key>'" if not header else "invalid API key"
            return await send_error(send, APIError(401, message, code="invalid_api_key"))
        return await self.app(scope, receive, send)


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)

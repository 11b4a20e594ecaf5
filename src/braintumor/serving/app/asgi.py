"""The little of ASGI the app's guards need: who is asking, what a route is, and a short
refusal sent without running the route.

The guards (``login.LoginThrottleMiddleware``, ``uploads.UploadGuard``) sit between
gradio's server and its routes, because gradio's hooks do not see the client: its
``auth`` callable receives a user name and a password, nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Gradio's routes under its API prefix.
API_PREFIX = "/gradio_api"


def client_address(scope: Scope) -> str:
    """The peer's address. Behind a reverse proxy every client has the proxy's address:
    the limits then hold for all clients together."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def is_post(scope: Scope, *endings: str) -> bool:
    """Whether ``scope`` is an HTTP POST to a path ending with one of ``endings``."""
    if scope.get("type") != "http" or scope.get("method") != "POST":
        return False
    path = str(scope.get("path", "")).rstrip("/")
    return any(path.endswith(ending) for ending in endings)


def header(scope: Scope, name: bytes) -> str | None:
    """The value of request header ``name`` (lower case), or ``None``."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def refuse(send: Send, status: int, message: str, retry_after_s: int | None = None) -> None:
    """Answer ``status`` with ``{"detail": message}`` (gradio's error shape) and close."""
    body = json.dumps({"detail": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ResponseRecorder:
    """A ``send`` that passes a route's response through and keeps its status (and, with
    ``keep_body``, the body of a 200): what a guard needs to settle its accounts once the
    route has answered."""

    def __init__(self, send: Send, *, keep_body: bool = False) -> None:
        self.send = send
        self.keep_body = keep_body
        self.status: int | None = None
        self.body = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        elif self.keep_body and message["type"] == "http.response.body" and self.status == 200:
            self.body.extend(message.get("body", b""))
        await self.send(message)

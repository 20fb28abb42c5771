"""A pure-ASGI gate in front of the app: the token, the body's size and pace, before any parsing.

FastAPI reads and parses a request's whole body before it runs a route's dependencies,
so a check there comes too late: a client without the token, or with a 10 GiB body,
would already have cost the read. The gate answers from the headers first (401 without
the token, 413 for a Content-Length past the limit), then reads the body itself: a
chunked body is counted as it arrives (413 once past the limit), and the whole body has
a deadline (408), so neither a half-sent body nor one trickled a byte at a time can hold
a connection. The app
gets the body already read. Every refusal closes the connection: the rest of the body
is never read.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any, Awaitable, Callable, MutableMapping

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # the kubelet's probes carry no token


class Refusal(Exception):
    """An answer the gate gives instead of the app."""

    def __init__(self, status: int, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()):
        super().__init__(status, detail)
        self.status = status
        self.detail = detail
        self.headers = headers


class ClientGone(Exception):
    """The client disconnected while sending its body: nobody to answer."""


def check_token(headers: list[tuple[bytes, bytes]], token: str | None) -> None:
    """With a token configured, require `Authorization: Bearer <token>` (compared in constant time)."""
    if token is None:
        return
    given = b""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, given = value.partition(b" ")
            given = given.strip() if scheme.lower() == b"bearer" else b""
            break
    if not secrets.compare_digest(given, token.encode("utf-8")):
        raise Refusal(401, "a valid bearer token is required", ((b"www-authenticate", b"Bearer"),))


def check_length(headers: list[tuple[bytes, bytes]], limit: int) -> None:
    """413 at once when the declared Content-Length is past the limit (nothing of the body read)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise Refusal(400, "Content-Length is not a number") from None
            if length > limit:
                raise Refusal(413, f"the request body is {length} bytes; this server takes at most {limit} (--max-body-bytes)")


async def read_body(receive: Receive, *, limit: int, timeout: float) -> bytes:
    """The whole body, counted as it arrives: 413 past `limit` bytes, 408 if it is not all
    there `timeout` s after the headers (a deadline, not an idle timer: a trickle is cut too)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise Refusal(413, f"the request body is more than {limit} bytes (--max-body-bytes)")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise Refusal(408, f"the request body did not arrive within {timeout:g} s (--body-timeout-seconds)") from None


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body` once, then whatever the connection says (e.g. a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def again() -> Message:
        return pending.pop() if pending else await receive()

    return again


async def answer(send: Send, refusal: Refusal) -> None:
    """The refusal as a JSON `Problem`; `Connection: close`, since the body is left unread."""
    content = json.dumps({"detail": refusal.detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
        (b"connection", b"close"),
        *refusal.headers,
    ]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


class Gate:
    """`Gate(app, token=..., max_body_bytes=..., body_timeout_seconds=...)`: an ASGI app around `app`."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int, body_timeout_seconds: float):
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.body_timeout_seconds = body_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (and websockets, which the app does not serve)
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        try:
            if scope.get("path") not in OPEN_PATHS:
                check_token(headers, self.token)
            check_length(headers, self.max_body_bytes)
            body = await read_body(receive, limit=self.max_body_bytes, timeout=self.body_timeout_seconds)
        except Refusal as refusal:
            await answer(send, refusal)
            return
        except ClientGone:
            return
        await self.app(scope, replay(body, receive), send)

"""The HTTP edge: head limits, Host check, token check and body caps, before any route.

``HttpProtocol`` (uvicorn's httptools protocol) bounds each request head in
size and time while it is read. ``Guard``, a pure ASGI middleware, sees each
request before routing and body parsing, for the FastAPI routes and the
agent's Starlette routes alike: a request with a foreign Host or without the
token is answered before one byte of its body is read, and no body grows past
its route's cap (a declared Content-Length is refused up front; a chunked one
is counted as it arrives).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from skybatch import defaults

__all__ = [
    "AGENT_LOG_BODY_LIMIT",
    "BODY_LIMIT",
    "HEAD_LIMIT",
    "HEAD_TIMEOUT",
    "RELAY_PART_BODY_LIMIT",
    "SUBMIT_BODY_LIMIT",
    "Guard",
    "HttpProtocol",
    "body_limit",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MiB = 1024 * 1024
#: Most bodies are small JSON documents.
BODY_LIMIT = 1 * MiB
#: A submit or resume carries Dataset.from_items rows and the mapper's source.
SUBMIT_BODY_LIMIT = 256 * MiB
#: An agent ships a runner's new output, or a failed setup's last lines.
AGENT_LOG_BODY_LIMIT = 16 * MiB

#: A part uploaded through the relay (streamed to disk, not held).
RELAY_PART_BODY_LIMIT = defaults.RELAY_PART_BYTES

#: The request line and headers together: our clients send well under 1 KiB.
HEAD_LIMIT = 64 * 1024
#: A connection's first request head, and any head that spans reads, must be complete
#: this long after it started (a client trickling a head byte by byte holds a connection).
HEAD_TIMEOUT = 30.0

_OPEN = "/v1/health"


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with each request head bounded in size and time.

    httptools gathers a header (even a single value) until it ends and uvicorn
    keeps every header until the head ends, without limit; the Guard sees a
    request only after that. So anyone who reaches the port could fill the
    server's memory without a token. Here a head still incomplete after more
    than ``HEAD_LIMIT`` bytes gets 431 and the connection is closed. Bytes are
    counted per read, not per header, so nothing is added per header on the
    hot path; the read a head starts in is not counted (it may end the
    previous request), so at most ``HEAD_LIMIT`` plus one read (256 KiB) is held.
    """

    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None

    def _in_head(self) -> bool:
        # uvicorn makes a fresh scope when a request starts and sets its method
        # once the head is complete.
        scope = self.scope
        return scope is not None and "method" not in scope

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        in_head = self._in_head()
        super().data_received(data)
        if not self._in_head():
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            return
        if self.transport.is_closing():
            return
        if not in_head:
            self._head_bytes = 0
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)
            return
        self._head_bytes += len(data)
        if self._head_bytes > HEAD_LIMIT:
            self._refuse(
                431,
                f"request head too large: the request line and headers take at most "
                f"{HEAD_LIMIT // 1024} KiB ({HEAD_LIMIT} bytes)",
            )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._refuse(408, f"request head not complete within {HEAD_TIMEOUT:g}s of its start")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a one-line error and close (as uvicorn's 400 does)."""
        if self.cycle is None or self.cycle.response_complete:
            # (Behind a pipelined request still being answered, an answer now would
            # land inside that one's: then the connection is only closed.)
            body = orjson.dumps({"error": {"type": "ConfigError", "message": message}})
            content = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend(
                [
                    b"content-type: application/json\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
            self.transport.write(b"".join(content))
        self.transport.close()


def body_limit(method: str, path: str) -> int:
    """The most bytes a request body to ``method path`` may carry."""
    # String tests, not regexes: this runs for every lease, heartbeat and commit.
    if method != "POST":
        return BODY_LIMIT
    if path == "/v1/jobs" or (path.startswith("/v1/jobs/") and path.endswith("/resume")):
        return SUBMIT_BODY_LIMIT
    if path.startswith("/v1/agent/"):
        if "/logs/" in path or path.endswith("/setup-failed"):
            return AGENT_LOG_BODY_LIMIT
        if path.endswith("/part"):
            return RELAY_PART_BODY_LIMIT
    return BODY_LIMIT


def _too_large(method: str, path: str, limit: int) -> str:
    size = f"{limit // MiB} MiB" if limit % MiB == 0 else f"{limit} bytes"
    return f"request body too large: {method} {path} takes at most {size} ({limit} bytes)"


class _TooLarge(Exception):
    """Raised into the app when a streamed body passes its cap (the 413 is already sent)."""


class Guard:
    def __init__(self, app: ASGIApp, token: str, port: int, host: str | None = None) -> None:
        self.app = app
        self._auth = f"Bearer {token}".encode()
        # Only the names this server is reached by: a browser page on another origin
        # whose name was rebound to 127.0.0.1 still sends its own name as Host.
        names = ["127.0.0.1", "localhost", "[::1]"]
        if host:
            # The address it serves (with --host), as agents on other machines name it.
            shown = f"[{host}]" if ":" in host else host
            if shown not in names:
                names.insert(0, shown.lower())
        self._hosts = {f"{h}:{port}".encode() for h in names}
        self._host_hint = ", ".join(f"{h}:{port}" for h in names[:-1]) + f" or {names[-1]}:{port}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = b""
        hosts = 0
        auth = b""
        length = b""
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
                hosts += 1
            elif name == b"authorization":
                auth = value
            elif name == b"content-length":
                length = value
        if hosts > 1:
            # Proxies and frameworks disagree on which one counts: trust neither.
            await _answer(send, 400, "ConfigError", "more than one Host header; send exactly one")
            return
        if host.lower() not in self._hosts:
            shown = host.decode("latin-1")[:100]
            await _answer(
                send,
                421,
                "ConfigError",
                f"this server answers only Host {self._host_hint}, not {shown!r}; use the URL "
                "in SKYBATCH_HOME/server.json",
            )
            return
        path: str = scope["path"]
        if path != _OPEN and not secrets.compare_digest(auth, self._auth):
            await _answer(
                send,
                401,
                "AuthError",
                "missing or wrong token; clients read it from SKYBATCH_HOME/token",
            )
            return
        method: str = scope["method"]
        limit = body_limit(method, path)
        if length:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                await _answer(send, 400, "ConfigError", "invalid Content-Length header")
                return
            if declared > limit:
                await _answer(send, 413, "ConfigError", _too_large(method, path, limit))
                return
            # The HTTP server delivers no more than the declared length: nothing to count.
            await self.app(scope, receive, send)
            return
        await self._capped(scope, receive, send, limit)

    async def _capped(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app, counting body bytes as they arrive; past ``limit``, answer 413."""
        received = 0
        started = False
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    error = _too_large(scope["method"], scope["path"], limit)
                    if not started:
                        refused = True
                        await _answer(send, 413, "ConfigError", error)
                    raise _TooLarge(error)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the app's answer to the body it could not read: already answered
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not refused:
                raise


async def _answer(send: Send, status: int, kind: str, message: str) -> None:
    body = orjson.dumps({"error": {"type": kind, "message": message}})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

"""The HTTP edge: Host check, token check and body caps, before any route runs.

A pure ASGI middleware, so it sees each request before routing and body
parsing, for the FastAPI routes and the agent's Starlette routes alike: a
request with a foreign Host or without the token is answered before one byte
of its body is read, and no body grows past its route's cap (a declared
Content-Length is refused up front; a chunked one is counted as it arrives).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

__all__ = ["AGENT_LOG_BODY_LIMIT", "BODY_LIMIT", "SUBMIT_BODY_LIMIT", "Guard", "body_limit"]

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

_OPEN = "/v1/health"


def body_limit(method: str, path: str) -> int:
    """The most bytes a request body to ``method path`` may carry."""
    # String tests, not regexes: this runs for every lease, heartbeat and commit.
    if method != "POST":
        return BODY_LIMIT
    if path == "/v1/jobs" or (path.startswith("/v1/jobs/") and path.endswith("/resume")):
        return SUBMIT_BODY_LIMIT
    if path.startswith("/v1/agent/") and ("/logs/" in path or path.endswith("/setup-failed")):
        return AGENT_LOG_BODY_LIMIT
    return BODY_LIMIT


def _too_large(method: str, path: str, limit: int) -> str:
    size = f"{limit // MiB} MiB" if limit % MiB == 0 else f"{limit} bytes"
    return f"request body too large: {method} {path} takes at most {size} ({limit} bytes)"


class _TooLarge(Exception):
    """Raised into the app when a streamed body passes its cap (the 413 is already sent)."""


class Guard:
    def __init__(self, app: ASGIApp, token: str, port: int) -> None:
        self.app = app
        self._auth = f"Bearer {token}".encode()
        # Only the names this server is reached by: a browser page on another origin
        # whose name was rebound to 127.0.0.1 still sends its own name as Host.
        self._hosts = {f"{h}:{port}".encode() for h in ("127.0.0.1", "localhost", "[::1]")}
        self._host_hint = f"127.0.0.1:{port}, localhost:{port} or [::1]:{port}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = b""
        auth = b""
        length = b""
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"authorization":
                auth = value
            elif name == b"content-length":
                length = value
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

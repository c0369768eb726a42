"""The agent's HTTP client: keep-alive HTTP/1.1 over the standard library.

An agent makes a few requests per lease of batches; with many agents on a few
cores their cost is CPU the mappers do not get. httpx spent ~0.7 ms of CPU per
request here, ``http.client`` ~0.2 ms. One connection per thread (the agent's
threads call at once, and an ``http.client`` connection is one request at a
time), over TCP, TLS with a pinned certificate, or the SSH tunnel's Unix socket.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any

import orjson

__all__ = ["Client", "Response", "TransportError"]

#: Reconnect before reusing a connection idle this long: the server closes idle ones
#: (uvicorn after 5 s), and a request sent as it does would fail for nothing.
IDLE_REUSE = 4.0


_CLOSED = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class TransportError(OSError):
    """No answer from the server: it could not be reached, or the connection dropped."""


class Response:
    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return orjson.loads(self.content)


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (the URL still names the server, for its Host check)."""

    def __init__(self, path: str, host: str, port: int | None, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Client:
    """Requests to one server; safe to share between threads."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        timeout: float,
        context: ssl.SSLContext | None = None,
        uds: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urllib.parse.urlsplit(self.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port
        self._headers = {"Connection": "keep-alive", **headers}
        self._timeout = timeout
        self._context = context
        self._uds = uds
        self._local = threading.local()

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        local = self._local
        conn: http.client.HTTPConnection | None = getattr(local, "conn", None)
        if conn is not None and time.monotonic() - local.used > IDLE_REUSE:
            conn.close()
            conn = None
        if conn is None:
            if self._uds is not None:
                conn = _UnixConnection(self._uds, self._host, self._port, timeout)
            elif self._https:
                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=timeout, context=self._context
                )
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Response:
        headers = dict(self._headers)
        body = content
        if json is not None:
            body = orjson.dumps(json)
            headers["Content-Type"] = "application/json"
        if params:
            path = f"{path}?{urllib.parse.urlencode(params)}"
        for tries_left in (1, 0):
            conn = self._connection(self._timeout if timeout is None else timeout)
            reused = conn.sock is not None
            try:
                conn.request(method, path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                break
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                # A kept-alive connection the server had closed: once more, on a new one.
                if reused and tries_left and isinstance(e, _CLOSED):
                    continue
                raise TransportError(f"{method} {path}: {type(e).__name__}: {e}") from e
        if answer.will_close:
            self._drop()
        else:
            self._local.used = time.monotonic()
        return Response(answer.status, data)

    def close(self) -> None:
        self._drop()

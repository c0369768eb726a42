"""The HTTP protocol under the Guard: request heads bounded in size and time.

uvicorn runs in a thread of the test process with a trivial app, so the limits
are checked in milliseconds; tests/e2e/test_api_guard.py floods a real server.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from skybatch.server import guard
from skybatch.server.guard import HEAD_LIMIT, HttpProtocol


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    answer = str(len(body)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(answer)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture
def port() -> Iterator[int]:
    """A uvicorn server with skybatch's protocol on 127.0.0.1, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(app, http=HttpProtocol, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    return conn


def read_all(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (10 s at most)."""
    got = b""
    deadline = time.monotonic() + 10
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while time.monotonic() < deadline:
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


def send_until_refused(conn: socket.socket, head: bytes, piece: bytes, total: int) -> int:
    """Send ``head``, then ``piece`` until ``total`` bytes went or the server closed."""
    sent = 0
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.sendall(head)
        while sent < total:
            conn.sendall(piece)
            sent += len(piece)
    return sent


def error(answer: bytes) -> tuple[bytes, str]:
    status, _, rest = answer.partition(b"\r\n")
    body = rest.split(b"\r\n\r\n", 1)[1]
    return status, json.loads(body)["error"]["message"]


TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large",
    f"request head too large: the request line and headers take at most 64 KiB ({HEAD_LIMIT} "
    "bytes)",
)


def test_requests_with_ordinary_heads_pass(port: int) -> None:
    with connect(port) as conn:
        headers = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(100))  # 10 KiB
        conn.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n" + headers + b"Connection: close\r\n\r\n")
        assert read_all(conn).endswith(b"\r\n\r\n0")


@pytest.mark.parametrize(
    "piece", [b"X-B: 1\r\n", b"v" * 65536], ids=["many headers", "one endless value"]
)
def test_an_endless_head_gets_431_and_is_not_read(port: int, piece: bytes) -> None:
    head = b"GET / HTTP/1.1\r\nHost: h\r\n" + (b"X-Big: " if len(piece) > 100 else b"")
    with connect(port) as conn:
        # Before: the server read all 64 MB (and kept them) and never answered.
        sent = send_until_refused(conn, head, piece * (65536 // len(piece)), 64 * 1024 * 1024)
        assert error(read_all(conn)) == TOO_LARGE
    assert sent < 8 * 1024 * 1024  # the kernel's buffers, not the server, took the rest
    with connect(port) as conn:  # the server goes on
        conn.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert read_all(conn).endswith(b"\r\n\r\n0")


def test_pipelined_big_body_then_a_request_is_no_false_431(port: int) -> None:
    body = b"x" * (200 * 1024)
    first = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    second = b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    with connect(port) as conn:
        conn.sendall(first + second)
        answer = read_all(conn)
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer[:300]
    assert answer.endswith(b"\r\n\r\n0")


def test_a_trickled_head_times_out(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard, "HEAD_TIMEOUT", 0.5)
    with connect(port) as idle, connect(port) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\n")
        start = time.monotonic()
        for _ in range(3):  # each byte before the timeout: a trickle does not extend it
            time.sleep(0.1)
            slow.sendall(b"X")
        # Before: both stayed open for as long as the client wished.
        expected = (
            b"HTTP/1.1 408 Request Timeout",
            "request head not complete within 0.5s of its start",
        )
        assert error(read_all(slow)) == expected
        assert error(read_all(idle)) == expected
        assert time.monotonic() - start < 3
    with connect(port) as conn:  # a prompt request on a fresh connection is not cut
        time.sleep(0.2)
        conn.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        time.sleep(0.6)  # past the timeout, idle between requests: keep-alive's business
        conn.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert read_all(conn).count(b"HTTP/1.1 200 OK") == 2

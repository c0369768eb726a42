"""A fake agent: the agent protocol's control plane alone, as fast as a client can drive it.

Workload 5 starts these in place of `skybatch.agent` (the test provider's `agent_command`),
so they get what a real agent gets: the environment and the token on stdin. Each registers,
says it is ready, and then runs `FAKE_AGENT_THREADS` loops of lease and commit (no input read,
no runner, no part written) while the file named by `FAKE_AGENT_GO` exists. Without it they
send nothing: idle long polls of the pool would load the server while another is measured.

It speaks HTTP/1.1 over plain keep-alive sockets rather than httpx: httpx costs a few hundred
microseconds of CPU per request, so on a 2-core machine the clients, not the server, would be
what is measured.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any, NoReturn
from urllib.parse import urlsplit

import orjson

from skybatch.batches import lease_from_wire


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects once when the server closed it."""

    def __init__(self, url: str, token: str) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.head = f"Host: {parts.netloc}\r\nAuthorization: Bearer {token}\r\n".encode()
        self.sock: socket.socket | None = None
        self.buffer = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        return sock

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        data = orjson.dumps(body)
        request = (
            f"POST {path} HTTP/1.1\r\n".encode()
            + self.head
            + b"Content-Type: application/json\r\nContent-Length: "
            + str(len(data)).encode()
            + b"\r\n\r\n"
            + data
        )
        for tries in (1, 2):
            try:
                if self.sock is None:
                    self.sock = self._connect()
                self.sock.sendall(request)
                return self._response()
            except (OSError, ConnectionError):
                if self.sock is not None:
                    self.sock.close()
                self.sock = None
                if tries == 2:
                    raise
        raise AssertionError("unreachable")

    def _read_until(self, marker: bytes) -> int:
        assert self.sock is not None
        while (end := self.buffer.find(marker)) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buffer += chunk
        return end

    def _response(self) -> tuple[int, Any]:
        assert self.sock is not None
        end = self._read_until(b"\r\n\r\n")
        head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, orjson.loads(body) if body else None


def _die(why: str) -> NoReturn:
    # From any thread: the worker is gone (409) or the protocol is not what we speak.
    print(f"fake agent: {why}", flush=True)
    os._exit(1)


def lease(conn: Connection, worker: int, most: int) -> list[int]:
    """Up to `most` leased attempts: from `{"leases": [...]}`, or the older `{"lease": ...}`."""
    status, answer = conn.post(
        f"/v1/agent/workers/{worker}/lease", {"prefetch": False, "wait": 0.5, "max": most}
    )
    if status != 200:
        _die(f"lease answered {status}: {answer}")
    wires = answer["leases"] if "leases" in answer else [answer["lease"]]
    return [lease_from_wire(w)[0] for w in wires if w is not None]


#: Whether the server takes a worker's commits in one request (None: not known yet).
_batched_commit: bool | None = None


def commit(conn: Connection, worker: int, attempts: list[int]) -> int:
    """Commits `attempts`, in one request where the server offers it; returns how many it took."""
    global _batched_commit
    if _batched_commit is not False:
        status, answer = conn.post(f"/v1/agent/workers/{worker}/commit", {"attempts": attempts})
        if status == 200:
            _batched_commit = True
            return len(attempts) - len(answer.get("refused", []))
        if status not in (404, 405) or _batched_commit:
            _die(f"commit answered {status}: {answer}")
        _batched_commit = False
    taken = 0
    for attempt in attempts:
        status, answer = conn.post(f"/v1/agent/attempts/{attempt}/commit", {})
        if status not in (200, 409):  # 409: no longer its lease (cancelled)
            _die(f"commit answered {status}: {answer}")
        taken += status == 200
    return taken


def loop(
    url: str, token: str, worker: int, most: int, go: str, counts: list[int], slot: int
) -> None:
    conn = Connection(url, token)
    while True:
        if go and not os.path.exists(go):
            time.sleep(0.02)
            continue
        attempts = lease(conn, worker, most)
        if attempts:
            counts[slot] += commit(conn, worker, attempts)


def main() -> int:
    url = os.environ["SKYBATCH_SERVER_URL"]
    worker = int(os.environ["SKYBATCH_WORKER_ID"])
    token = sys.stdin.readline().strip()
    threads = int(os.environ.get("FAKE_AGENT_THREADS", "4"))
    most = int(os.environ.get("FAKE_AGENT_MAX", "1"))
    go = os.environ.get("FAKE_AGENT_GO", "")
    conn = Connection(url, token)
    status, answer = conn.post(f"/v1/agent/workers/{worker}/register", {"pid": os.getpid()})
    if status != 200:
        print(f"fake agent: not registered: {status} {answer}", flush=True)
        return 0
    conn.post(f"/v1/agent/workers/{worker}/ready", {})
    counts = [0] * threads
    for slot in range(threads):
        threading.Thread(
            target=loop, args=(url, token, worker, most, go, counts, slot), daemon=True
        ).start()
    while True:  # the provider ends us with SIGTERM
        time.sleep(5)
        print(f"fake agent {worker}: {sum(counts)} commits", flush=True)


if __name__ == "__main__":
    sys.exit(main())

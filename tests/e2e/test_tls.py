"""A server on a non-loopback address serves HTTPS only, and agents trust its certificate
and no other.

The address is one end of a veth pair on a private /24 that the test picks and removes
afterwards: an address of this machine that is not loopback, reached without leaving it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import skybatch
from skybatch.config import Home, pinned_context
from skybatch.server.tls import ensure_certificate
from tests.helpers import Deployment, read_jsonl, wait_for, write_jsonl


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def address() -> Iterator[str]:
    """An address of this machine on a /24 no interface or route uses yet."""
    taken = _ip("-4", "route", "show", "table", "all") + _ip("-4", "addr")
    rng = random.Random()
    for _ in range(100):
        net = f"10.{rng.randint(16, 250)}.{rng.randint(1, 250)}"
        if f"{net}." not in taken:
            break
    else:
        raise AssertionError("no free private /24 in 10.16-250.x")
    name = f"sbtls{os.getpid() % 100000}"
    _ip("link", "add", name, "type", "veth", "peer", "name", f"{name}p")
    try:
        _ip("addr", "add", f"{net}.1/24", "dev", name)
        _ip("link", "set", name, "up")
        _ip("link", "set", f"{name}p", "up")
        yield f"{net}.1"
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)
    assert name not in _ip("link")


@skybatch.remote_function
def shout():
    for batch in skybatch.load():
        skybatch.save_results([{"text": item["text"].upper()} for item in batch])


def test_non_loopback_server_serves_https_only_and_a_job_runs(
    deployment: Deployment, address: str, tmp_path: Path
) -> None:
    started = deployment.cli("server", "start", "--host", address).stdout
    info = json.loads(deployment.home.server_file.read_text())
    url, port = info["url"], info["port"]
    assert url == f"https://{address}:{port}"
    assert started == f"Server running at {url} (pid {info['pid']}).\n"
    assert deployment.home.key_file.stat().st_mode & 0o777 == 0o600
    cert = deployment.home.cert_file.read_text()

    # A local pool's agents find the certificate in the home; the job runs end to end.
    deployment.pool("p", workers=2)
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": f"row {i}"} for i in range(10)])
    out = tmp_path / "out.jsonl"
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        shout, pool_name="p", batch_size=3, output=skybatch.JsonWriter(str(out))
    )
    assert read_jsonl(out) == [{"text": f"ROW {i}"} for i in range(10)]
    assert "Server running at " + url in deployment.cli("server", "status").stdout

    # The one certificate opens it; plain HTTP, other trust and loopback do not.
    assert httpx.get(f"{url}/v1/health", verify=pinned_context(cert)).status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{address}:{port}/v1/health", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/v1/health", timeout=5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)

    # The token is in no log and on no command line.
    token = deployment.home.token_file.read_text().strip()
    for path in (deployment.home.root / "logs").rglob("*"):
        if path.is_file():
            assert token not in path.read_text(errors="replace"), f"the token is in {path}"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert token not in ps.stdout

    # Public only while asked for: the next start without --host is back on loopback.
    deployment.cli("server", "stop")
    restarted = deployment.cli("server", "start").stdout
    assert restarted.startswith("Server running at http://127.0.0.1:"), restarted
    deployment.cli("server", "stop")
    for wildcard in ("0", "::0", "0:0:0:0:0:0:0:0", "0.0.0.0"):
        refused = deployment.cli("server", "start", "--host", wildcard, check=False)
        assert refused.returncode == 1
        assert refused.stderr == (
            f"Error: --host {wildcard} names no one address agents could reach the server "
            "by; give the address of this machine that the workers reach (`ip addr`)\n"
        )


class Impostor(threading.Thread):
    """A TLS server with a certificate of its own; records what clients send after the
    handshake (the request, with its token)."""

    def __init__(self, host: str, home: Home) -> None:
        super().__init__(daemon=True)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(home.cert_file, home.key_file)
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.1)
        self.url = f"https://{host}:{self.sock.getsockname()[1]}"
        self.received = bytearray()
        self.handshakes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    self.received += tls.recv(65536)

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=5)
        self.sock.close()


def _agent(url: str, token: str, cert: str, workdir: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYBATCH_")}
    env.update(SKYBATCH_SERVER_URL=url, SKYBATCH_WORKER_ID="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "skybatch.agent"],
        cwd=workdir,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(f"{token}\n{cert}")
    proc.stdin.close()
    return proc


def test_agent_trusts_only_the_certificate_it_was_given(address: str, tmp_path: Path) -> None:
    homes = {}
    for name in ("server", "impostor"):
        homes[name] = Home(tmp_path / name)
        homes[name].root.mkdir(mode=0o700)
        ensure_certificate(homes[name], address)
    impostor = Impostor(address, homes["impostor"])
    impostor.start()
    token = "a-token-for-the-real-server-only"
    agents: list[subprocess.Popen[str]] = []
    try:
        # Given the real server's certificate, the agent refuses the impostor's at the
        # handshake and exits: not one byte of HTTP, so not the token, reaches it.
        agents.append(_agent(impostor.url, token, homes["server"].cert_file.read_text(), tmp_path))
        assert agents[-1].wait(timeout=60) == 0
        assert agents[-1].stdout is not None
        output = agents[-1].stdout.read()
        assert (
            output.strip()
            .splitlines()[-1]
            .endswith(
                f"exiting: the server at {impostor.url} showed a TLS certificate other than the "
                "one this agent was given"
            )
        )
        assert (impostor.handshakes, bytes(impostor.received)) == (0, b"")

        # The same agent given the impostor's certificate talks to it: pinning is all
        # that stood between them.
        agents.append(
            _agent(impostor.url, token, homes["impostor"].cert_file.read_text(), tmp_path)
        )
        wait_for(lambda: b"\r\n\r\n" in impostor.received, message="a request")
        assert bytes(impostor.received).startswith(b"POST /v1/agent/workers/1/register ")
        assert f"Bearer {token}".encode() in impostor.received
    finally:
        for agent in agents:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(timeout=10)
            if agent.stdout is not None:
                agent.stdout.close()
        impostor.close()

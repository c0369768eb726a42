"""The server process.

One server per ``SKYBATCH_HOME``: it holds ``server.lock`` for its whole life,
binds 127.0.0.1 (or ``--host`` / ``SKYBATCH_SERVER_HOST``, asked for at each start)
on the configured port (``SKYBATCH_SERVER_PORT``), else the port it had last time,
else any free one, and records pid and URL in ``server.json``. Any
address but loopback is served over HTTPS only, with the home's self-signed
certificate (``tls.py``). Clients find, start and stop it with ``client/launcher.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from skybatch.config import Home, forbid_inspection, open_private, read_server_info
from skybatch.config import home as current_home
from skybatch.errors import ServerError, SkyBatchError
from skybatch.server.homefiles import write_server_file
from skybatch.server.tls import ensure_certificate, is_loopback

__all__ = ["main", "serve"]

HOST = "127.0.0.1"
#: The address to serve when ``--host`` is not given (``server.host`` of the deployment).
HOST_ENV = "SKYBATCH_SERVER_HOST"


def _host(given: str | None) -> str:
    """The address to bind: given, else configured, else loopback. Never remembered from a
    previous run: a server is public only while someone asks for it, each time."""
    host = (given or os.environ.get(HOST_ENV) or HOST).strip("[]")
    if _unspecified(host):
        raise ServerError(
            f"--host {host} names no one address agents could reach the server by; "
            "give the address of this machine that the workers reach (`ip addr`)"
        )
    return host


def _unspecified(host: str) -> bool:
    """Whether ``host`` means every interface (0.0.0.0, ::, 0, ::0 and other spellings)."""
    if host == "*":
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        return False  # a name: it resolves to an address of this machine, or _bind says so
    return any(ipaddress.ip_address(info[4][0]).is_unspecified for info in infos)


def _url(host: str, port: int, tls: bool) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def _bind(home: Home, host: str) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ServerError(
            f"cannot serve on --host {host}: {e.strerror}; give an address or name of this "
            "machine (`ip addr`)"
        ) from None
    wanted = []
    if os.environ.get("SKYBATCH_SERVER_PORT"):
        wanted.append(int(os.environ["SKYBATCH_SERVER_PORT"]))
    else:
        previous = read_server_info(home)
        if previous:
            # Agents that outlived a crash look for their server where it was.
            wanted.append(int(previous.get("port", 0)))
        wanted.append(0)
    last_error: OSError | None = None
    for port in wanted:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            last_error = e
            continue
        sock.listen(2048)
        sock.set_inheritable(False)
        return sock
    where = f"{host}:{wanted[0]}" if wanted[0] else host
    raise ServerError(
        f"cannot bind {where}: {last_error}; give an address of this machine (`ip addr`) "
        "and a free port"
    )


def serve(home: Home, host: str | None = None) -> int:
    import uvicorn

    from skybatch.server.app import create_app
    from skybatch.server.context import Context
    from skybatch.server.guard import HttpProtocol
    from skybatch.server.store import SqliteStore

    home.ensure()
    forbid_inspection()  # mappers run as our user: keep them out of /proc/<server>/mem
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    lock = os.fdopen(open_private(home.server_lock), "w")  # held for the life of the process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"a skybatch server already runs for {home.root}", file=sys.stderr)
        return 0
    token = home.create_token()
    host = _host(host)
    # Off this machine the token would cross the network in the clear: TLS or nothing.
    tls = not is_loopback(host)
    cert = ensure_certificate(home, host) if tls else None
    sock = _bind(home, host)
    port = sock.getsockname()[1]
    url = _url(host, port, tls)
    ctx = Context(home=home, store=SqliteStore(home.db), token=token, url=url, cert=cert)
    app = create_app(ctx)
    # httptools (fast per request), with each request head bounded in size and time.
    config = uvicorn.Config(
        app,
        http=HttpProtocol,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
        ssl_certfile=str(home.cert_file) if tls else None,
        ssl_keyfile=str(home.key_file) if tls else None,
    )
    write_server_file(home, url)
    logging.getLogger("skybatch.server").info("serving %s on %s", home.root, url)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Long polls would hold the shutdown for their whole wait: end them first.
            loop = ctx.notifier._loop
            if loop is not None:
                loop.call_soon_threadsafe(ctx.notifier.close)
            super().handle_exit(sig, frame)

    try:
        Server(config).run(sockets=[sock])
    finally:
        info = read_server_info(home)
        if info and info.pid == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                home.server_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skybatch.server")
    parser.add_argument("--home", help="deployment directory (default: SKYBATCH_HOME)")
    parser.add_argument("--detach", action="store_true", help="run in the background")
    parser.add_argument(
        "--host", help=f"address to serve (default: ${HOST_ENV}, else {HOST}); not loopback: HTTPS"
    )
    args = parser.parse_args(argv)
    home = Home(Path(args.home).resolve()) if args.home else current_home()
    try:
        # A wrong --host fails here, before the fork, where the starting client sees it.
        _bind(home, _host(args.host)).close()
        if args.detach:
            if os.fork() > 0:
                os._exit(0)
            os.setsid()
        return serve(home, args.host)
    except SkyBatchError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1

"""The server process.

One server per ``SKYBATCH_HOME``: it holds ``server.lock`` for its whole life,
binds 127.0.0.1 on the configured port (``SKYBATCH_SERVER_PORT``), else the
port it had last time, else any free one, and records pid and URL in
``server.json``. Clients find, start and stop it with ``client/launcher.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
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

__all__ = ["main", "serve"]

HOST = "127.0.0.1"


def _bind(home: Home) -> socket.socket:
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
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as e:
            sock.close()
            last_error = e
            continue
        sock.listen(2048)
        sock.set_inheritable(False)
        return sock
    raise ServerError(f"cannot bind {HOST}:{wanted[0]}: {last_error}")


def serve(home: Home) -> int:
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
    sock = _bind(home)
    port = sock.getsockname()[1]
    url = f"http://{HOST}:{port}"
    ctx = Context(home=home, store=SqliteStore(home.db), token=token, url=url)
    app = create_app(ctx)
    # httptools (fast per request), with each request head bounded in size and time.
    config = uvicorn.Config(
        app,
        http=HttpProtocol,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
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
    args = parser.parse_args(argv)
    if args.detach:
        if os.fork() > 0:
            os._exit(0)
        os.setsid()
    home = Home(Path(args.home).resolve()) if args.home else current_home()
    try:
        return serve(home)
    except SkyBatchError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1

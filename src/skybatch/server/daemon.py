"""The server process, and how clients find, start and stop it.

One server per ``SKYBATCH_HOME``: it holds ``server.lock`` for its whole life,
binds 127.0.0.1 on the configured port (``SKYBATCH_SERVER_PORT``), else the
port it had last time, else any free one, and records pid and URL in
``server.json``. Clients start it on first use.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from skybatch import defaults
from skybatch.config import Home, forbid_inspection
from skybatch.config import home as current_home
from skybatch.errors import ServerError, SkyBatchError

__all__ = ["ServerInfo", "ensure_server", "read_server_info", "stop_server"]

HOST = "127.0.0.1"


class ServerInfo(dict[str, Any]):
    @property
    def url(self) -> str:
        return str(self["url"])

    @property
    def pid(self) -> int:
        return int(self["pid"])


def read_server_info(home: Home) -> ServerInfo | None:
    try:
        return ServerInfo(json.loads(home.server_file.read_text()))
    except (FileNotFoundError, ValueError):
        return None


def _healthy(url: str) -> bool:
    try:
        r = httpx.get(f"{url}/v1/health", timeout=2.0)
    except httpx.HTTPError:
        return False
    if r.status_code == 503:
        # It runs, but lost its state: say why rather than start another one.
        with contextlib.suppress(ValueError, KeyError, TypeError):
            raise ServerError(str(r.json()["error"]))
    return r.status_code == 200


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def running_server(home: Home) -> ServerInfo | None:
    info = read_server_info(home)
    if info and _pid_alive(info.pid) and _healthy(info.url):
        return info
    return None


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode(errors="replace").strip()


def ensure_server(home: Home | None = None) -> ServerInfo:
    """The running server of ``home``, started now if it is not running."""
    home = (home or current_home()).ensure()
    home.read_token()  # refuses a token someone else planted, before a server adopts it
    info = running_server(home)
    if info:
        return info
    with os.fdopen(_open_private(home.start_lock), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another client may be starting it right now
        info = running_server(home)
        if info:
            return info
        home.server_log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        previous = read_server_info(home)
        log_fd = os.open(home.server_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(log_fd, "ab") as out:
            # --detach forks again and returns at once: the server is no child of ours.
            subprocess.run(
                [sys.executable, "-m", "skybatch.server", "--home", str(home.root), "--detach"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        deadline = time.monotonic() + defaults.SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            info = read_server_info(home)
            if info and info != previous and _pid_alive(info.pid):
                if _healthy(info.url):
                    return info
            elif info and info != previous:
                raise ServerError(
                    f"the skybatch server exited at start; see {home.server_log}: "
                    f"{_tail(home.server_log)}"
                )
            time.sleep(0.05)
        raise ServerError(
            f"the skybatch server did not answer within {defaults.SERVER_START_TIMEOUT:.0f}s; "
            f"see {home.server_log}"
        )


def stop_server(home: Home | None = None, timeout: float = 30.0) -> bool:
    """Stop the server (and so its pools' agents); False if none was running."""
    home = (home or current_home()).check()  # server.json names the pid we signal
    info = read_server_info(home)
    if info is None or not _pid_alive(info.pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(info.pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGKILL)
    return True


def _open_private(path: Path, flags: int = 0) -> int:
    """``path`` opened for writing, created 0600 (and made 0600 if an older skybatch
    left it 0644): everything in the home is the user's alone."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | flags, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def write_server_file(home: Home, url: str) -> None:
    """Record this server's pid and URL in ``server.json``, for clients to find it."""
    port = int(url.rsplit(":", 1)[1])
    tmp = home.server_file.with_suffix(".tmp")
    with os.fdopen(_open_private(tmp, os.O_TRUNC), "w") as f:
        json.dump({"pid": os.getpid(), "url": url, "port": port, "started": time.time()}, f)
    os.replace(tmp, home.server_file)


def reopen_log(home: Home) -> None:
    """Send this process's output (its log) to ``logs/server.log`` again, made anew."""
    home.ensure()
    log_fd = os.open(home.server_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)


def restore_home(home: Home, token: str, url: str, deployment: str | None) -> None:
    """The home was deleted under this server, which restored state.db: put back what
    the next server needs to go on as this one (the same token and deployment id) and
    this server's log, which was deleted with the rest."""
    reopen_log(home)
    if home.read_token() is None:
        with os.fdopen(_open_private(home.token_file, os.O_EXCL), "w") as f:
            f.write(token)
    if deployment and home.read_deployment_id() is None:
        with os.fdopen(_open_private(home.deployment_file, os.O_EXCL), "w") as f:
            f.write(deployment)
    write_server_file(home, url)


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
    from skybatch.server.sqlite import SqliteStore

    home.ensure()
    forbid_inspection()  # mappers run as our user: keep them out of /proc/<server>/mem
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    lock = os.fdopen(_open_private(home.server_lock), "w")  # held for the life of the process
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

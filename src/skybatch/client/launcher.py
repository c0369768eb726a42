"""How clients find, start and stop their home's server (the server's own process code
is ``server/daemon.py``; the two meet only in ``server.json``, read by ``config.py``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

from skybatch import defaults
from skybatch.config import Home, ServerInfo, open_private, read_server_info, server_ssl
from skybatch.config import home as current_home
from skybatch.errors import ServerError

__all__ = ["ensure_server", "running_server", "stop_server"]


def _healthy(url: str, home: Home) -> bool:
    # An HTTPS server is trusted only with the certificate in its home.
    verify = server_ssl(home, url) or True
    try:
        r = httpx.get(f"{url}/v1/health", timeout=2.0, verify=verify)
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
    if info and _pid_alive(info.pid) and _healthy(info.url, home):
        return info
    return None


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode(errors="replace").strip()


def _check_host(info: ServerInfo, host: str | None) -> ServerInfo:
    served = urlsplit(info.url).hostname
    if host and served != host.strip("[]"):
        raise ServerError(
            f"the server already runs at {info.url}, not on {host}; stop it first "
            f"(`skybatch server stop`), then `skybatch server start --host {host}`"
        )
    return info


def ensure_server(home: Home | None = None, host: str | None = None) -> ServerInfo:
    """The running server of ``home``, started now if it is not running; ``host`` is the
    address it serves (HTTPS unless loopback), by default 127.0.0.1."""
    home = (home or current_home()).ensure()
    home.read_token()  # refuses a token someone else planted, before a server adopts it
    info = running_server(home)
    if info:
        return _check_host(info, host)
    with os.fdopen(open_private(home.start_lock), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another client may be starting it right now
        info = running_server(home)
        if info:
            return _check_host(info, host)
        home.server_log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        previous = read_server_info(home)
        log_fd = os.open(home.server_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(log_fd, "ab") as out:
            # --detach forks again and returns at once: the server is no child of ours.
            started = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "skybatch.server",
                    "--home",
                    str(home.root),
                    "--detach",
                    *(["--host", host] if host else []),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if started.returncode != 0:
            # It refused before detaching (a --host it cannot serve): its one line says why.
            last = _tail(home.server_log, 500).splitlines()[-1:] or ["(no output)"]
            raise ServerError(last[0].removeprefix("Error: "))
        deadline = time.monotonic() + defaults.SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            info = read_server_info(home)
            if info and info != previous and _pid_alive(info.pid):
                if _healthy(info.url, home):
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

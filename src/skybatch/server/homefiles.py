"""What the server writes into its home beside ``state.db``: ``server.json`` and its log,
and how it puts them back when the home is deleted under it.

Apart from ``daemon.py``, which starts the app that calls :func:`restore_home`:
the two importing each other would be a circle.
"""

from __future__ import annotations

import json
import os
import time

from skybatch.config import Home, open_private

__all__ = ["reopen_log", "restore_home", "write_server_file"]


def write_server_file(home: Home, url: str) -> None:
    """Record this server's pid and URL in ``server.json``, for clients to find it."""
    port = int(url.rsplit(":", 1)[1])
    tmp = home.server_file.with_suffix(".tmp")
    with os.fdopen(open_private(tmp, os.O_TRUNC), "w") as f:
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
        with os.fdopen(open_private(home.token_file, os.O_EXCL), "w") as f:
            f.write(token)
    if deployment and home.read_deployment_id() is None:
        with os.fdopen(open_private(home.deployment_file, os.O_EXCL), "w") as f:
            f.write(deployment)
    write_server_file(home, url)

"""Where a deployment lives: ``SKYBATCH_HOME`` and the files in it."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Home", "home"]


@dataclass(frozen=True)
class Home:
    """One deployment's directory. Each holds its own server, token and state."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    @property
    def token_file(self) -> Path:
        return self.root / "token"

    @property
    def server_file(self) -> Path:
        """JSON with the running server's pid, host and port."""
        return self.root / "server.json"

    @property
    def server_lock(self) -> Path:
        """Held (flock) by the running server for its whole life."""
        return self.root / "server.lock"

    @property
    def start_lock(self) -> Path:
        """Held by a client while it starts a server, so two clients start one."""
        return self.root / "start.lock"

    @property
    def server_log(self) -> Path:
        return self.root / "logs" / "server.log"

    def pool_dir(self, pool: str) -> Path:
        return self.root / "pools" / pool

    def worker_dir(self, pool: str, index: int) -> Path:
        return self.pool_dir(pool) / f"worker-{index}"

    def worker_log(self, pool: str, index: int) -> Path:
        return self.root / "logs" / "pools" / pool / f"worker-{index}.log"

    def job_log(self, job_id: int, worker_index: int) -> Path:
        return self.root / "logs" / "jobs" / str(job_id) / f"worker-{worker_index}.log"

    def ensure(self) -> Home:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / "logs").mkdir(exist_ok=True)
        return self

    def read_token(self) -> str | None:
        try:
            return self.token_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def create_token(self) -> str:
        """Return the deployment's token, creating it (mode 0600) on first use."""
        existing = self.read_token()
        if existing:
            return existing
        token = secrets.token_urlsafe(32)
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        return token


def home() -> Home:
    """The deployment named by ``SKYBATCH_HOME`` (default ``~/.skybatch``)."""
    raw = os.environ.get("SKYBATCH_HOME") or os.path.join("~", ".skybatch")
    return Home(Path(raw).expanduser().resolve())

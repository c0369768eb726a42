"""Where a deployment lives: ``SKYBATCH_HOME`` and the files in it."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import ssl
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skybatch.errors import ConfigError

__all__ = [
    "Home",
    "ServerInfo",
    "forbid_inspection",
    "home",
    "open_private",
    "pinned_context",
    "read_server_info",
    "server_ssl",
]

_GROUP_OTHER = stat.S_IRWXG | stat.S_IRWXO
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def _owner_error(what: str, path: Path, uid: int, fix: str) -> ConfigError:
    return ConfigError(f"{what} {path} is owned by uid {uid}, not you (uid {os.getuid()}); {fix}")


def forbid_inspection() -> None:
    """Make /proc/<this pid>/environ and mem unreadable by other processes of our user
    (mappers included); a no-op where prctl is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        pass


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

    @property
    def cert_file(self) -> Path:
        """The server's self-signed TLS certificate (PEM), made the first time it serves
        a non-loopback address; clients and agents trust it and nothing else."""
        return self.root / "server.crt"

    @property
    def key_file(self) -> Path:
        """The private key of ``cert_file`` (0600)."""
        return self.root / "server.key"

    def pool_dir(self, pool: str) -> Path:
        return self.root / "pools" / pool

    def worker_dir(self, pool: str, index: int) -> Path:
        return self.pool_dir(pool) / f"worker-{index}"

    def worker_log(self, pool: str, index: int) -> Path:
        return self.root / "logs" / "pools" / pool / f"worker-{index}.log"

    def job_log(self, job_id: int, worker_index: int) -> Path:
        return self.root / "logs" / "jobs" / str(job_id) / f"worker-{worker_index}.log"

    def ensure(self) -> Home:
        """Create the home (0700) if needed and check that it is ours alone."""
        self._check_parents()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.check()
        (self.root / "logs").mkdir(exist_ok=True, mode=0o700)
        return self

    def _check_parents(self) -> None:
        # Whoever can rename entries of a parent can swap our home for theirs.
        for parent in self.root.parents:
            try:
                st = parent.stat()
            except FileNotFoundError:
                continue  # mkdir creates it, as ours
            if st.st_uid not in (os.getuid(), 0):
                raise ConfigError(
                    f"SKYBATCH_HOME {self.root} lies inside {parent}, which uid {st.st_uid} "
                    f"owns, not you (uid {os.getuid()}); set SKYBATCH_HOME to a directory of "
                    "your own"
                )
            if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
                raise ConfigError(
                    f"SKYBATCH_HOME {self.root} lies inside {parent}, which anyone can write "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}, not sticky); set SKYBATCH_HOME to a "
                    "directory of your own"
                )

    def check(self) -> Home:
        """Refuse a home (or its state, log and server files) that someone else owns or
        can write; take group and other permissions off ours. A missing home passes."""
        self._check_parents()
        try:
            st = self.root.stat()
        except FileNotFoundError:
            return self
        if st.st_uid != os.getuid():
            raise _owner_error(
                "SKYBATCH_HOME",
                self.root,
                st.st_uid,
                "remove it or set SKYBATCH_HOME to a directory of your own",
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & _WRITABLE_BY_OTHERS:
            raise ConfigError(
                f"SKYBATCH_HOME {self.root} is writable by others (mode {mode:04o}), so files "
                f"in it may be someone else's; remove it, or check its contents and run "
                f"`chmod 700 {self.root}`"
            )
        if mode & _GROUP_OTHER:
            os.chmod(self.root, 0o700)
        private = (
            self.db,
            self.root / "state.db-wal",
            self.root / "state.db-shm",
            self.key_file,
        )
        for path in (*private, self.root / "logs", self.server_log):
            self._check_file(path, tighten=True)
        for path in (self.server_file, self.server_lock, self.start_lock, self.cert_file):
            self._check_file(path, tighten=False)
        return self

    @staticmethod
    def _check_file(path: Path, tighten: bool) -> None:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if st.st_uid != os.getuid():
            raise _owner_error(
                "skybatch file", path, st.st_uid, "remove it (or the whole SKYBATCH_HOME)"
            )
        if stat.S_ISLNK(st.st_mode):
            raise ConfigError(f"skybatch file {path} is a symbolic link; remove it")
        if tighten and st.st_mode & _GROUP_OTHER:
            os.chmod(path, 0o700 if stat.S_ISDIR(st.st_mode) else 0o600)

    def read_token(self) -> str | None:
        """The token, if this user made it: one someone else owns or can read is refused."""
        try:
            fd = os.open(self.token_file, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ConfigError(
                f"cannot read token file {self.token_file} ({e.strerror}); remove it and "
                "restart the server (`skybatch server stop`, then any command)"
            ) from None
        with os.fdopen(fd) as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.getuid():
                raise _owner_error(
                    "token file",
                    self.token_file,
                    st.st_uid,
                    "remove it; the server makes a new one when it starts",
                )
            if st.st_mode & _GROUP_OTHER:
                raise ConfigError(
                    f"token file {self.token_file} is open to others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}), so it may not be yours alone; "
                    "remove it and restart the server (`skybatch server stop`, then any command)"
                )
            return f.read().strip() or None

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

    @property
    def deployment_file(self) -> Path:
        """This deployment's random id (0600): it names the job staging areas it
        creates beside outputs, which other deployments may share."""
        return self.root / "deployment"

    def read_deployment_id(self) -> str | None:
        """The deployment's id, or None before its server first ran."""
        try:
            value = self.deployment_file.read_text().strip()
        except FileNotFoundError:
            return None
        if not _DEPLOYMENT_ID.fullmatch(value):
            from skybatch.errors import ConfigError

            raise ConfigError(
                f"{self.deployment_file} holds no deployment id; delete it (a new one is made "
                "when the server starts; jobs already submitted keep theirs)"
            )
        return value

    def deployment_id(self) -> str:
        """The deployment's id, created on first use."""
        existing = self.read_deployment_id()
        if existing:
            return existing
        # Written in full under a private name, then linked into place: a reader
        # never sees a half-written id, and of two creators exactly one wins.
        fd, tmp = tempfile.mkstemp(prefix=".deployment-", dir=self.root)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(8))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.deployment_file)
        finally:
            os.unlink(tmp)
        value = self.read_deployment_id()
        assert value is not None
        return value


#: What :meth:`Home.deployment_id` writes: 16 hex digits.
_DEPLOYMENT_ID = re.compile(r"[0-9a-f]{16}")


def home() -> Home:
    """The deployment named by ``SKYBATCH_HOME`` (default ``~/.skybatch``)."""
    raw = os.environ.get("SKYBATCH_HOME") or os.path.join("~", ".skybatch")
    return Home(Path(raw).expanduser().resolve())


class ServerInfo(dict[str, Any]):
    """``server.json``: the running server's pid, URL and port, written by the server."""

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


def pinned_context(cert_pem: str) -> ssl.SSLContext:
    """A client TLS context that trusts exactly the certificate ``cert_pem`` (self-signed):
    no system CA, and no host name check, since the pinned certificate is the identity."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=cert_pem)
    return context


def server_ssl(home: Home, url: str) -> ssl.SSLContext | None:
    """How a client of ``home`` verifies its server at ``url``: None for plain HTTP (a
    loopback server), else a context pinned to the certificate in the home."""
    if not url.startswith("https://"):
        return None
    try:
        pem = home.cert_file.read_text()
    except OSError as e:
        raise ConfigError(
            f"the server at {url} serves HTTPS but its certificate {home.cert_file} cannot be "
            f"read ({e.strerror}); restart the server (`skybatch server stop`, then "
            "`skybatch server start --host ADDR`)"
        ) from None
    return pinned_context(pem)


def open_private(path: Path, flags: int = 0) -> int:
    """``path`` opened for writing, created 0600 (and made 0600 if an older skybatch
    left it 0644): everything in the home is the user's alone."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | flags, 0o600)
    os.fchmod(fd, 0o600)
    return fd

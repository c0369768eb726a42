"""One host over the system's OpenSSH client: a master connection that every command
shares (ControlMaster), commands with bounded time, and a reverse tunnel to the server
that a thread keeps open.

The tunnel ends in a Unix socket on the host (OpenSSH's streamlocal forwarding), not a
port on its loopback: any user there can bind a loopback port that a dropped tunnel
left free, and agents would send them the token. The socket lies in a directory of
its own that only our user may enter: ``${TMPDIR:-/tmp}/skybatch-<uid>-<name>/s``
(``/tmp`` when TMPDIR is long or holds characters an ``-R`` spec cannot), short enough
for a socket's ~104-byte path whatever ``remote_dir`` is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import psutil

from skybatch.errors import PoolError
from skybatch.pools.providers.ssh.config import Host, SshConfig

__all__ = ["CONNECT_TIMEOUT", "SOCKET_NAME", "Connection", "Tunnel", "kill_left_over", "last_line"]

log = logging.getLogger("skybatch.server")

#: Seconds ssh waits for a host to answer before it gives up.
CONNECT_TIMEOUT = 10
#: A connection that answers no keepalive for 3 × 5 s is dropped (and re-opened).
_ALIVE = ["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
#: Backoff of a tunnel that cannot be opened, in seconds: doubling up to the last.
_BACKOFF = (0.5, 10.0)

#: The tunnel's socket, inside its private directory on the host.
SOCKET_NAME = "s"
#: The longest socket directory a host's TMPDIR may give: the path's limit less "/s".
_SOCKET_DIR_ROOM = 96

_NOISE = re.compile(r"^(debug\d:|Warning: Permanently added|Connection to .* closed)")


def last_line(stderr: str) -> str:
    """ssh's own last word on stderr, without its debug chatter."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not _NOISE.match(ln)]
    return lines[-1] if lines else "no message from ssh"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _stop_tunnel(proc: subprocess.Popen[bytes]) -> None:
    """End the remote cat first, by closing its input: the session ends on the host
    before ssh exits, so nothing of ours is left there. SIGTERM when the host does not
    answer that within a second."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)
    _stop(proc)


class Connection:
    """Commands on one host, sharing one master connection while it lives."""

    def __init__(self, host: Host, config: SshConfig, control: Path) -> None:
        self.host = host
        self.config = config
        self.control = control
        self._master: subprocess.Popen[bytes] | None = None
        self._tried = 0.0
        self._lock = threading.Lock()

    def options(self) -> list[str]:
        """What every ssh to this host takes: the user's config and key, never a prompt."""
        args = ["ssh"]
        if self.config.ssh_config:
            args += ["-F", os.path.expanduser(self.config.ssh_config)]
        if self.config.identity_file:
            args += ["-i", os.path.expanduser(self.config.identity_file)]
            args += ["-o", "IdentitiesOnly=yes"]
        return [*args, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}", *_ALIVE]

    def _command(self, script: str) -> list[str]:
        # The remote login shell may be anything (fish, zsh): hand the script to sh.
        return [
            *self.options(),
            "-o", "ControlMaster=no", "-o", f"ControlPath={self.control}",
            *self.host.destination(), "sh -c " + shlex.quote(script),
        ]  # fmt: skip

    def ensure_master(self) -> None:
        """Open the master connection if none lives (a dead one's commands go direct)."""
        with self._lock:
            if self._master is not None and self._master.poll() is None:
                return
            with contextlib.suppress(FileNotFoundError):
                self.control.unlink()  # a socket its dead master left behind
            self._tried = time.monotonic()
            # Its stderr to a file, not a pipe: nobody reads it after the start, and a
            # write to a closed pipe would end the master.
            with tempfile.TemporaryFile() as err:
                proc = subprocess.Popen(
                    [
                        *self.options(), "-M", "-N", "-o", "ControlPersist=no",
                        "-o", f"ControlPath={self.control}", *self.host.destination(),
                    ],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                    start_new_session=True,
                )  # fmt: skip
                deadline = time.monotonic() + CONNECT_TIMEOUT + 5
                while not self.control.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        _stop(proc)
                        err.seek(0)
                        message = last_line(err.read().decode(errors="replace"))
                        raise PoolError(f"cannot reach host {self.host.text}: {message}")
                    time.sleep(0.02)
            self._master = proc

    def revive_master(self, every: float = 10.0) -> None:
        """Open the master again if it died (a dropped link), at most once per ``every`` s;
        meanwhile commands go over connections of their own."""
        if self._master is not None and self._master.poll() is None:
            return
        if time.monotonic() - self._tried < every:
            return
        with contextlib.suppress(PoolError):
            self.ensure_master()

    def resolved(self) -> tuple[str, str, str]:
        """(user, hostname, port) that ssh makes of this host with the pool's config
        (``ssh -G``, which connects nowhere): one machine however ``hosts:`` names it."""
        try:
            done = subprocess.run(
                [*self.options(), "-G", *self.host.destination()],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=CONNECT_TIMEOUT,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PoolError(f"host {self.host.text}: ssh -G failed: {e}") from None
        if done.returncode != 0:
            raise PoolError(f"host {self.host.text}: ssh -G failed: {last_line(done.stderr)}")
        found: dict[str, str] = {}
        for line in done.stdout.splitlines():
            key, _, value = line.strip().partition(" ")
            found.setdefault(key.lower(), value.strip())
        return found.get("user", ""), found.get("hostname", "").lower(), found.get("port", "")

    def run(
        self, script: str, stdin: bytes | None = None, timeout: float = 60, what: str = "command"
    ) -> str:
        """Run ``script`` on the host and return its stdout; PoolError (one line, naming the
        host) when ssh or the script fails or time runs out."""
        try:
            done = subprocess.run(
                self._command(script),
                input=stdin if stdin is not None else b"",
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise PoolError(
                f"host {self.host.text}: {what} did not finish within {timeout:.0f}s"
            ) from None
        if done.returncode != 0:
            message = last_line(done.stderr.decode(errors="replace"))
            if done.returncode == 255:
                raise PoolError(f"cannot reach host {self.host.text}: {message}")
            raise PoolError(f"host {self.host.text}: {what} failed: {message}")
        return done.stdout.decode(errors="replace")

    def popen(self, script: str) -> subprocess.Popen[bytes]:
        """``script`` on the host with a pipe to its stdin (a tar stream, say)."""
        return subprocess.Popen(
            self._command(script),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def close(self) -> None:
        with self._lock:
            if self._master is not None:
                _stop(self._master)
                self._master = None
            with contextlib.suppress(FileNotFoundError):
                self.control.unlink()

    def pids(self) -> list[int]:
        with self._lock:
            return [self._master.pid] if self._master and self._master.poll() is None else []


def _socket_script(name: str, path: str | None) -> str:
    """sh that makes the tunnel's socket directory (``umask 077; mkdir``) and removes a
    socket a dropped tunnel left there (sshd does not replace one), then prints
    ``ok <socket>``; or prints ``refused <directory> [<mode> <owner uid>]`` for one
    that is not ours alone or cannot be made. ``path``: the socket agents already use,
    else one is chosen."""
    if path is not None:
        choose = f"d={shlex.quote(os.path.dirname(path))}"
    else:
        fallback = f"/tmp/skybatch-$(id -u)-{name}"
        choose = f"""d=${{TMPDIR:-/tmp}}; d=${{d%/}}/skybatch-$(id -u)-{name}
case $d in /*) ;; *) d={fallback} ;; esac
case $d in *[!A-Za-z0-9/._-]*) d={fallback} ;; esac
[ ${{#d}} -le {_SOCKET_DIR_ROOM} ] || d={fallback}"""
    # find -perm: owner rwx and no group or other bit (POSIX find has no "-perm /077");
    # -type d without -L: a symlink there is refused, not followed.
    private = " ".join(f"! -perm -{bit:03o}" for bit in (0o40, 0o20, 0o10, 0o4, 0o2, 0o1))
    return f"""umask 077
{choose}
mkdir "$d" 2>/dev/null
if [ -z "$(find "$d" -prune -type d -user "$(id -u)" -perm -700 {private} 2>/dev/null)" ]; then
  echo "refused $d $(ls -ldn "$d" 2>/dev/null | awk '{{print $1, $3}}')"; exit 0
fi
rm -f "$d/{SOCKET_NAME}" && echo "ok $d/{SOCKET_NAME}"
"""


class Tunnel:
    """``ssh -R <socket>:127.0.0.1:<server port> <host> cat`` to one host, kept open by a thread:
    a dropped one is opened again, with a bounded backoff, until ``close``. Before each
    opening the socket's directory is checked and a stale socket removed (see above).

    ``name`` tells this tunnel's directory apart on the host; ``path`` is the socket
    agents already use (after a server restart), else it is chosen at the first
    opening. ``error`` is one line naming the host when the last opening failed."""

    def __init__(
        self,
        conn: Connection,
        name: str,
        server_port: int,
        on_pid: Callable[[], None],
        path: str | None = None,
    ) -> None:
        self.conn = conn
        self.name = name
        self.path = path
        self.server_port = server_port
        self._on_pid = on_pid  # the provider records the pids it may leave behind
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = threading.Event()
        self._up = threading.Event()
        self._settled = threading.Event()  # up, or the first opening failed
        self._prepared = False  # the directory was found ours: close may tidy it
        self.error = ""
        self._thread = threading.Thread(
            target=self._keep, name=f"ssh-tunnel-{conn.host.text}", daemon=True
        )
        self._thread.start()

    def _prepare(self) -> str:
        host = self.conn.host.text
        out = self.conn.run(
            _socket_script(self.name, self.path),
            timeout=CONNECT_TIMEOUT + 10,
            what="preparing the tunnel's socket",
        ).strip()
        word, _, rest = (out.splitlines() or [""])[-1].partition(" ")
        if word == "ok" and rest.startswith("/"):
            return rest
        if word == "refused":
            directory, *found = rest.split()
            what = (
                f"is not this user's alone (mode {found[0]}, owner uid {found[1]})"
                if len(found) == 2
                else "cannot be made"
            )
            raise PoolError(
                f"host {host}: the tunnel's socket directory {directory} {what}; remove it, "
                "or set TMPDIR there to a directory of this user's"
            )
        raise PoolError(f"host {host}: preparing the tunnel's socket answered {out[-200:]!r}")

    def _open(self, path: str) -> subprocess.Popen[bytes]:
        # -v: ssh says "remote forward success" once sshd listens on the socket; with
        # ExitOnForwardFailure it exits instead when it cannot.
        # A session (a remote cat), not -N: sshd sets TCP_NODELAY on a connection only
        # when a session starts. Without it every request the agent writes in two
        # pieces (headers, then body) waits out Nagle and the client's delayed ACK,
        # ~40 ms. The cat reads our stdin, never written: it ends, and so the session
        # and this ssh, when we close that pipe (see _stop_tunnel) or when we die.
        return subprocess.Popen(
            [
                *self.conn.options(), "-v", "-o", "ExitOnForwardFailure=yes",
                "-o", "ControlMaster=no", "-o", "ControlPath=none",
                "-R", f"{path}:127.0.0.1:{self.server_port}",
                *self.conn.host.destination(), "sh -c 'exec cat'",
            ],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip

    def _keep(self) -> None:
        delay = _BACKOFF[0]
        while not self._closed.is_set():
            try:
                self.path = self._prepare()
                self._prepared = True
            except PoolError as e:
                self.error = str(e)
            else:
                if self._run(self.path):
                    delay = _BACKOFF[0]  # it was up: a drop is retried at once
            self._settled.set()
            if self._closed.wait(delay):
                return
            delay = min(delay * 2, _BACKOFF[1])

    def _run(self, path: str) -> bool:
        """One ssh, until it exits: whether its forward was up."""
        proc = self._open(path)
        self._proc = proc
        if self._closed.is_set():  # closed while the socket was prepared
            _stop_tunnel(proc)
        try:
            self._on_pid()
        except Exception:  # recording pids is a courtesy: never the keeper's end
            log.exception("recording the tunnel's pid failed")
        assert proc.stderr is not None
        tail: deque[str] = deque(maxlen=20)
        was_up = False
        for raw in proc.stderr:  # ends when ssh exits
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            if "remote forward success" in line:
                was_up = True
                self.error = ""
                self._up.set()
                self._settled.set()
        proc.stderr.close()
        proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        self._up.clear()
        message = last_line("\n".join(tail))
        self.error = f"cannot open a tunnel to host {self.conn.host.text}: {message}"
        return was_up

    def wait_up(self, timeout: float) -> bool:
        """Whether the first opening succeeded (False as soon as it failed)."""
        self._settled.wait(timeout)
        return self._up.is_set()

    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def close(self) -> None:
        """Stop the ssh; with the master still there, remove the socket and its directory
        (nothing serves them now); an unreachable host keeps them for the next opening."""
        self._closed.set()
        proc = self._proc
        if proc is not None:
            _stop_tunnel(proc)
        self._thread.join(timeout=10)
        if self._prepared and self.path is not None and self.conn.pids():
            directory = os.path.dirname(self.path)
            with contextlib.suppress(PoolError):
                self.conn.run(
                    f"rm -f {shlex.quote(self.path)}; rmdir {shlex.quote(directory)}",
                    timeout=CONNECT_TIMEOUT,
                    what="removing the tunnel's socket",
                )


def kill_left_over(pid: int, start: float) -> None:
    """An ssh a previous server left running (it crashed), by pid and start time."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if abs(proc.create_time() - start) <= 1 and os.path.basename(proc.cmdline()[0]) == "ssh":
            proc.kill()

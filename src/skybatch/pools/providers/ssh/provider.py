"""The SSH provider: agents on hosts the server reaches with the system's ``ssh``.

Worker ``i`` runs on ``hosts[i % len(hosts)]``, so a pool spreads over its hosts
before it doubles up (``workers_per_host`` bounds how far). Per host the provider
keeps one master connection that its commands share and one reverse tunnel that
maps a Unix socket on the host, which only our user there can reach, to the server's
port, so the server stays on 127.0.0.1 (see ``connection.py``). An agent's files
live under ``<remote_dir>/<deployment id>/`` on its host, laid out like a
SKYBATCH_HOME: ``pools/<pool>/worker-<n>/``, its log in that directory's
``.skybatch/agent.log``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import posixpath
import shlex
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import psutil

from skybatch import defaults
from skybatch.config import Home
from skybatch.errors import PoolError, PoolSpecError
from skybatch.pools import gpus as gpu
from skybatch.pools.gpus import Held
from skybatch.pools.providers.base import Provider, ServerAccess, WorkerLaunch
from skybatch.pools.providers.ssh import shipping
from skybatch.pools.providers.ssh.config import Host, SshConfig
from skybatch.pools.providers.ssh.connection import (
    CONNECT_TIMEOUT,
    Connection,
    Tunnel,
    kill_left_over,
    last_line,
)
from skybatch.pools.registry import ProviderConfig
from skybatch.pools.spec import PoolSpec

__all__ = ["UNREACHABLE_GRACE", "SshProvider"]

log = logging.getLogger("skybatch.server")

_LAUNCHER = (Path(__file__).parent / "launcher.py").read_text()

#: Seconds a host may stay unreachable before its agents count as lost. Longer than a
#: lease: their batches are re-leased at once anyway, and an agent that comes back
#: after a short cut carries on (its stale commits are refused).
UNREACHABLE_GRACE = 90.0
#: A liveness answer is reused this long: one `/proc` read per host per monitor tick.
_ALIVE_TTL = 0.4
#: How long the first liveness check of an agent waits for a read that covers it (the
#: one check that waits): a host that takes longer answers it "alive" for now.
_FIRST_READ_WAIT = 2.0
#: A pid not asked about for this long drops out of its host's reads.
_ASKED_TTL = 10.0
#: Unix socket paths hold about 100 bytes; a control socket needs its name too.
_SOCKET_ROOM = 90


class _Seen:
    """What one host's last `/proc` read found, refreshed in the background: liveness
    checks come from the server's monitor, which one unanswering host must not hold up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: pid → when a liveness check last asked about it
        self.asked: dict[int, float] = {}
        #: pid → (state, start time), for the pids the last good read covered
        self.found: dict[int, tuple[str, str]] = {}
        self.covered: set[int] = set()
        #: When the last read ended (0: read again at the next check).
        self.at = 0.0
        self.ok = True
        self.unreachable_since: float | None = None
        #: When the read in flight started; None when none is.
        self.reading_since: float | None = None
        #: Signalled when a read ends.
        self.done = threading.Condition(self.lock)
        #: (pid, start) of agents terminate stopped: dead whatever an older read says.
        self.stopped: set[tuple[int, str]] = set()


class SshProvider(Provider):
    """One agent per worker on SSH hosts, reaching the server through a reverse tunnel
    per host."""

    config_model: ClassVar[type[ProviderConfig]] = SshConfig
    shares_files: ClassVar[bool] = False

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        assert isinstance(config, SshConfig)
        self.ssh: SshConfig = config
        self.hosts: list[Host] = config.parsed_hosts()
        self._by_text = {h.text: h for h in self.hosts}
        # Names this provider's files apart from another pool's provider section.
        self.key = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:10]
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._host_locks = {h.text: threading.Lock() for h in self.hosts}
        self._conns: dict[str, Connection] = {}
        self._tunnels: dict[str, Tunnel] = {}
        self._pythons: dict[str, str] = {}
        self._seen = {h.text: _Seen() for h in self.hosts}
        self._pools: set[str] = set()
        # pool → agents a `pool down` could not stop (host out of reach), for its answer.
        self._not_stopped: dict[str, list[str]] = {}
        self._home: Home | None = None
        self._control: Path | None = None
        self._server_port: int | None = None

    # -- where things are ----------------------------------------------------------------

    def _use_home(self, home: Home) -> None:
        with self._lock:
            if self._home is not None:
                return
            self._home = home
            private = home.root / "ssh"
            private.mkdir(mode=0o700, exist_ok=True)
            control = private / "c"
            if len(str(control)) + 1 + 17 > _SOCKET_ROOM:
                # A deep home: the sockets go to a private directory under /tmp.
                control = Path(tempfile.mkdtemp(prefix="skybatch-ssh-"))
            control.mkdir(mode=0o700, exist_ok=True)
            self._control = control

    @property
    def _state_file(self) -> Path:
        assert self._home is not None
        return self._home.root / "ssh" / f"{self.key}.json"

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return {"sockets": {}, "pids": []}
        return state if isinstance(state, dict) else {"sockets": {}, "pids": []}

    def _save_state(self) -> None:
        """Tunnel sockets (agents keep using theirs across server restarts) and the pids of
        the ssh processes running now (a crashed server's are killed by the next one)."""
        with self._lock:
            pids = [p for c in self._conns.values() for p in c.pids()]
            pids += [p for t in self._tunnels.values() if (p := t.pid()) is not None]
            sockets = {h: t.path for h, t in self._tunnels.items() if t.path}
        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                procs.append([pid, psutil.Process(pid).create_time()])
        if self._home is None:
            return
        with self._state_lock:
            tmp = self._state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"sockets": sockets, "pids": procs}))
            tmp.replace(self._state_file)

    def _conn(self, host: Host) -> Connection:
        with self._lock:
            conn = self._conns.get(host.text)
            if conn is None:
                if self._control is None:
                    # No home yet (a handle checked before any launch): sockets under /tmp.
                    self._control = Path(tempfile.mkdtemp(prefix="skybatch-ssh-"))
                name = hashlib.sha256(f"{self.key}\0{host.text}".encode()).hexdigest()[:16]
                conn = Connection(host, self.ssh, self._control / name)
                self._conns[host.text] = conn
            return conn

    def _connected(self, host: Host) -> Connection:
        conn = self._conn(host)
        started = conn.pids()
        conn.ensure_master()
        if conn.pids() != started and self._home is not None:
            self._save_state()
        return conn

    def _host_of(self, index: int) -> Host:
        host = self.hosts[index % len(self.hosts)]
        if index // len(self.hosts) >= self.ssh.workers_per_host:
            raise PoolError(
                f"worker {index} does not fit on {len(self.hosts)} hosts with "
                f"workers_per_host: {self.ssh.workers_per_host}; raise provider.workers_per_host"
            )
        return host

    @staticmethod
    def _remote_home(remote_dir: str, home: Home) -> str:
        return f"{remote_dir}/{home.deployment_id()}"

    # -- the server side: attach, tunnels, close -----------------------------------------

    def attach(self, access: ServerAccess) -> None:
        super().attach(access)
        self._use_home(access.home)
        self._server_port = urlsplit(access.url).port
        state = self._read_state()
        for pid, start in state.get("pids", []):
            kill_left_over(int(pid), float(start))  # what a crashed server left running
        # Agents of a previous server run may still be out there, talking to their
        # tunnel's socket: open the same sockets again, to this server's port. (A
        # "tunnels" entry, host → port, is an older server's: nothing serves it now.)
        for text, path in state.get("sockets", {}).items():
            host = self._by_text.get(text)
            if host is not None and isinstance(path, str):
                self._tunnel(host, path, wait=False)

    def _tunnel(self, host: Host, path: str | None = None, wait: bool = True) -> Tunnel:
        """The host's tunnel, opened if needed: on ``path`` when agents already use that
        socket, else on one chosen for this deployment, provider section and host."""
        assert self._server_port is not None and self._home is not None
        with self._host_locks[host.text]:
            tunnel = self._tunnels.get(host.text)
            if tunnel is not None:
                return tunnel
            seed = f"{self._home.deployment_id()}\0{self.key}\0{host.text}"
            name = hashlib.sha256(seed.encode()).hexdigest()[:12]
            tunnel = Tunnel(self._conn(host), name, self._server_port, self._save_state, path)
            if wait and not tunnel.wait_up(2 * CONNECT_TIMEOUT + 10):
                error = tunnel.error or f"cannot open a tunnel to host {host.text}: no answer"
                tunnel.close()
                raise PoolError(error)
            with self._lock:
                self._tunnels[host.text] = tunnel
            self._save_state()
            return tunnel

    def close(self) -> None:
        with self._lock:
            tunnels, conns = list(self._tunnels.values()), list(self._conns.values())
            self._tunnels.clear()
            self._conns.clear()
            self._pythons.clear()
        for tunnel in tunnels:
            tunnel.close()
        for conn in conns:
            conn.close()
        if self._home is not None:
            with contextlib.suppress(OSError):
                self._save_state()

    # -- check ---------------------------------------------------------------------------

    def check(self, spec: PoolSpec, held: Held | None = None) -> None:
        n, per = len(self.hosts), self.ssh.workers_per_host
        if spec.workers > n * per:
            need = -(-spec.workers // n)
            raise PoolSpecError(
                f"provider.workers_per_host: {spec.workers} workers do not fit on {n} "
                f"host{'s' if n > 1 else ''} × {per}; set workers_per_host to {need} or "
                "list more hosts"
            )
        if self._home is None and self.access is not None:
            self._use_home(self.access.home)
        self._check_distinct()
        with ThreadPoolExecutor(max_workers=min(16, n)) as pool:
            errors = [e for e in pool.map(self._check_host, self.hosts) if e]
        if errors:
            raise PoolSpecError(errors[0])
        accelerators = spec.resources.accelerators
        if accelerators is None:
            return
        # Worker i runs on hosts[i % n]: each host must fit the workers it gets.
        for i, host in enumerate(self.hosts):
            count = len(range(i, spec.workers, n))
            if not count:
                continue
            where = f"host {host.text}"
            try:
                present = self._gpus(host)
            except PoolError as e:
                raise PoolSpecError(
                    f"provider.hosts: {e}; the pool asks for {accelerators}"
                ) from None
            taken = (held or gpu.Held()).on(host.text, present)
            gpu.check_fits(present, taken, accelerators, count, where)

    def _check_distinct(self) -> None:
        """Refuse two entries that ssh takes to one (user, hostname, port): each would get
        its own share of workers_per_host on one machine."""
        first: dict[tuple[str, str, str], Host] = {}
        for host in self.hosts:
            try:
                where = self._conn(host).resolved()
            except PoolError as e:
                raise PoolSpecError(f"provider.hosts: {e}") from None
            other = first.setdefault(where, host)
            if other is not host:
                user, hostname, port = where
                raise PoolSpecError(
                    f"provider.hosts: {other.text!r} and {host.text!r} are one host "
                    f"({user}@{hostname}:{port}); list each host once and raise "
                    "workers_per_host for more workers on it"
                )

    def _check_host(self, host: Host) -> str | None:
        try:
            conn = self._connected(host)
            if self.ssh.python:
                want = importlib.metadata.version("skybatch")
                probe = "import importlib.metadata as m; print(m.version('skybatch'))"
                try:
                    found = conn.run(
                        f"{shlex.quote(self.ssh.python)} -c {shlex.quote(probe)}",
                        timeout=CONNECT_TIMEOUT + 20,
                        what="provider.python",
                    ).strip()
                except PoolError as e:
                    return f"provider.python: {e}; name an interpreter there that has skybatch"
                if found != want:
                    return (
                        f"provider.python: {self.ssh.python} on host {host.text} has skybatch "
                        f"{found}, the server {want}; install skybatch=={want} there or drop "
                        "provider.python to have the server ship it"
                    )
        except PoolError as e:
            return f"provider.hosts: {e}"
        return None

    def _gpus(self, host: Host) -> list[gpu.Gpu]:
        """The host's GPUs as its own ``nvidia-smi`` lists them ([] where it has none)."""
        query = " ".join(gpu.NVIDIA_SMI_QUERY)
        out = self._connected(host).run(
            f"command -v nvidia-smi >/dev/null 2>&1 || exit 0; {query}",
            timeout=CONNECT_TIMEOUT + 30,
            what="nvidia-smi",
        )
        try:
            return gpu.parse_nvidia_smi(out)
        except ValueError as e:
            raise PoolError(f"nvidia-smi on host {host.text}: {e}") from None

    def run(self, host: str, script: str, timeout: float = 60) -> str:
        """``script`` (sh) on ``host`` over its master connection: its stdout."""
        return self._connected(self._by_text[host]).run(script, timeout=timeout)

    # -- launch --------------------------------------------------------------------------

    def _python(self, host: Host, conn: Connection) -> str:
        if self.ssh.python:
            return self.ssh.python
        with self._host_locks[host.text]:
            python = self._pythons.get(host.text)
            if python is None:
                wheel = shipping.installed_wheel()
                python = conn.run(
                    shipping.install_script(self.ssh.remote_dir, wheel, check_only=True),
                    what="looking for skybatch's venv",
                ).strip()
                if not python:
                    log.info("installing skybatch %s on host %s", wheel.version, host.text)
                    python = conn.run(
                        shipping.install_script(self.ssh.remote_dir, wheel, check_only=False),
                        stdin=wheel.data,
                        timeout=900,
                        what="installing skybatch",
                    ).strip()
                self._pythons[host.text] = python.splitlines()[-1]
            return self._pythons[host.text]

    def _copy(self, conn: Connection, source: Path, target: str, name: str = ".") -> None:
        """``source`` into the directory ``target`` (quoted for sh), as ``name`` in it."""
        proc = conn.popen(f"mkdir -p {target} && tar -C {target} -xf -")
        assert proc.stdin is not None and proc.stderr is not None
        try:
            with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                tar.add(source, arcname=name)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the remote side failed: its stderr says why
        try:
            proc.wait(timeout=600)
        except Exception:
            proc.kill()
            proc.wait()
            raise
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if proc.returncode != 0:
            raise PoolError(f"host {conn.host.text}: copying {source} failed: {last_line(err)}")

    def _mount(self, conn: Connection, source: Path, target: str, worker_dir: str) -> None:
        """One ``file_mounts`` entry: a relative target is in the worker's directory, as
        workdir is; ``~/`` and absolute ones are the host's paths."""
        if not source.exists():
            raise PoolError(f"file_mounts: {source} does not exist any more; apply the pool again")
        if not (target.startswith("/") or target == "~" or target.startswith("~/")):
            target = posixpath.join(worker_dir, target)
        target = posixpath.normpath(target) if target != "~" else target
        if source.is_dir():
            self._copy(conn, source, shipping.remote_path(target))
        else:
            parent, name = posixpath.split(target)
            self._copy(conn, source, shipping.remote_path(parent or "."), name)

    def _place(self, worker: WorkerLaunch, host: Host) -> list[gpu.Gpu]:
        """The GPUs this worker gets on ``host``, claimed in the server's ledger by the
        UUIDs its nvidia-smi lists, as the local provider does."""
        accelerators = worker.spec.resources.accelerators
        if accelerators is None:
            return []
        where = f"host {host.text}"
        return worker.gpus.claim(
            worker.worker_id, worker.pool, host.text, self._gpus(host), accelerators, where
        )

    def launch(self, worker: WorkerLaunch) -> dict[str, Any]:
        self._use_home(worker.home)
        if self._server_port is None:
            self._server_port = urlsplit(worker.server_url).port
        source = Path(worker.spec.workdir) if worker.spec.workdir else None
        if source is not None and not source.is_dir():
            raise PoolError(f"workdir {source} is not a directory any more; apply the pool again")
        host = self._host_of(worker.index)
        conn = self._connected(host)
        socket_path = self._tunnel(host).path
        assert socket_path is not None  # set once it was up
        python = self._python(host, conn)
        home = self._remote_home(self.ssh.remote_dir, worker.home)
        rel = f"pools/{worker.pool}/worker-{worker.index}"
        if source is not None:
            self._copy(conn, source, shipping.remote_path(f"{home}/{rel}"))
        for target, mount in worker.spec.file_mounts.items():
            self._mount(conn, Path(mount), target, f"{home}/{rel}")
        placed = self._place(worker, host)
        gpus = [g.index for g in placed]
        scheme = urlsplit(worker.server_url).scheme or "http"
        env = {
            # A pool without accelerators sees no GPU unless its envs say otherwise; what
            # was placed wins over the envs (see the local provider).
            **gpu.cuda_env(gpus),
            **worker.spec.envs,
            **(gpu.cuda_env(gpus) if gpus else {}),
            # The server's own URL, for the Host it checks; its bytes go through the socket.
            "SKYBATCH_SERVER_URL": f"{scheme}://127.0.0.1:{self._server_port}",
            "SKYBATCH_SERVER_SOCKET": socket_path,
            "SKYBATCH_AGENT_SERVER_HOST": f"127.0.0.1:{self._server_port}",
            "SKYBATCH_WORKER_ID": str(worker.worker_id),
            "SKYBATCH_WORKER_INDEX": str(worker.index),
            "SKYBATCH_RELAY": "1",
            "PYTHONUNBUFFERED": "1",
        }
        request = {
            "home": home,
            "dir": rel,
            "python": python,
            "env": env,
            "token": worker.token,
            "cert": worker.server_cert,
        }
        answer = conn.run(
            f"{shlex.quote(python)} -c {shlex.quote(_LAUNCHER)}",
            stdin=json.dumps(request).encode() + b"\n",
            timeout=60,
            what="starting the agent",
        )
        try:
            started = json.loads(answer.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise PoolError(
                f"host {host.text}: the agent's launcher answered {answer.strip()[-200:]!r}"
            ) from None
        with self._lock:
            self._pools.add(worker.pool)
        return {
            "host": host.text,
            "pid": started["pid"],
            "start": started["start"],
            "dir": started["dir"],
            "home": started["home"],
            "socket": socket_path,
            "gpus": gpus,
            "gpu_uuids": [g.uuid for g in placed],
            # Where its output goes, for the server's messages: it has no log of its own.
            "log": f"{started['dir']}/.skybatch/agent.log",
        }

    # -- liveness and stopping -----------------------------------------------------------

    def _refresh(self, host: Host, conn: Connection, socket: str | None) -> None:
        """Read ``/proc`` on ``host`` for the pids asked about lately (in a thread of its
        own: one per host at a time, see :meth:`is_alive`)."""
        seen = self._seen[host.text]
        try:
            with self._lock:
                current = self._conns.get(host.text) is conn
            if current:  # not closed meanwhile: what a live host needs, kept up
                if socket and self._server_port is not None and self._home is not None:
                    self._tunnel(host, socket, wait=False)  # after a restart
                conn.revive_master()
            with seen.lock:
                now = time.monotonic()
                seen.asked = {p: t for p, t in seen.asked.items() if now - t < _ASKED_TTL}
                pids = sorted(seen.asked)
                seen.stopped = {s for s in seen.stopped if s[0] in seen.asked}
            script = (
                f"cd /proc && for p in {' '.join(map(str, pids))}; do [ -r $p/stat ] && "
                "echo $p $(sed 's/^.*) //' $p/stat | cut -d' ' -f1,20); done; true"
            )
            out = conn.run(script, timeout=CONNECT_TIMEOUT + 5, what="ps")
        except PoolError as e:
            with seen.lock:
                if seen.ok:
                    log.warning("%s", e)
                seen.ok, seen.at = False, time.monotonic()
                seen.unreachable_since = seen.unreachable_since or seen.reading_since
                seen.reading_since = None
                seen.done.notify_all()
            return
        except Exception:
            with seen.lock:
                seen.reading_since = None
                seen.done.notify_all()
            raise
        found = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0].isdigit():
                found[int(parts[0])] = (parts[1], parts[2])
        with seen.lock:
            seen.found, seen.covered, seen.ok = found, set(pids), True
            seen.at, seen.unreachable_since, seen.reading_since = time.monotonic(), None, None
            seen.done.notify_all()

    def _start_read(self, host: Host, conn: Connection, socket: str | None) -> None:
        """Start a read of ``host``'s ``/proc`` unless one is in flight (under its lock)."""
        seen = self._seen[host.text]
        if seen.reading_since is None:
            seen.reading_since = time.monotonic()
            threading.Thread(
                target=self._refresh, args=(host, conn, socket), daemon=True,
                name=f"skybatch-ssh-ps-{host.text}",
            ).start()  # fmt: skip

    def is_alive(self, handle: dict[str, Any]) -> bool:
        """From the host's last ``/proc`` read, never waiting on the network (but for an
        agent's first check): a read older than a tick starts the next one in the
        background. A host whose reads have failed for UNREACHABLE_GRACE counts its
        agents lost."""
        host = self._by_text.get(handle.get("host", ""))
        pid = handle.get("pid")
        if host is None or not pid:
            return False
        pid, start = int(pid), str(handle.get("start"))
        with self._lock:
            self._pools.add(Path(handle.get("dir", "")).parent.name)
        conn = self._conn(host)
        seen = self._seen[host.text]
        with seen.lock:
            now = time.monotonic()
            first = pid not in seen.asked
            seen.asked[pid] = now
            stale = now - seen.at >= _ALIVE_TTL or pid not in seen.covered
            socket = str(handle["socket"]) if handle.get("socket") else None
            if stale:
                self._start_read(host, conn, socket)
            if first and seen.ok:
                # Its launch or a restart: one short wait, so a fresh answer is a true one.
                deadline = now + _FIRST_READ_WAIT
                while pid not in seen.covered and seen.ok and time.monotonic() < deadline:
                    self._start_read(host, conn, socket)  # a read in flight may not cover it
                    seen.done.wait(max(0.0, deadline - time.monotonic()))
            if (pid, start) in seen.stopped:
                return False
            failing = seen.unreachable_since if not seen.ok else seen.reading_since
            if failing is not None and time.monotonic() - failing >= UNREACHABLE_GRACE:
                return False
            if not seen.ok or pid not in seen.covered:
                return True  # unknown yet, or the host out of reach for less than the grace
            state = seen.found.get(pid)
        return state is not None and state[1] == start and state[0] != "Z"

    def terminate(self, handle: dict[str, Any], grace: float) -> None:
        host = self._by_text.get(handle.get("host", ""))
        pid, start = handle.get("pid"), handle.get("start")
        if host is None or not pid:
            return
        steps = max(1, int(grace * 10))
        # The agent leads its own process group; a pid reused since is left alone.
        script = f"""
p={int(pid)}; s={shlex.quote(str(start))}
alive() {{
  [ -r /proc/$p/stat ] || return 1
  set -- $(sed 's/^.*) //' /proc/$p/stat | cut -d' ' -f1,20)
  [ "$1" != Z ] && [ "$2" = "$s" ]
}}
alive || exit 0
kill -TERM -$p 2>/dev/null || kill -TERM $p 2>/dev/null
i=0; while [ $i -lt {steps} ] && alive; do sleep 0.1; i=$((i+1)); done
kill -KILL -$p 2>/dev/null; true
"""
        try:
            self._conn(host).run(script, timeout=grace + CONNECT_TIMEOUT + 10, what="stopping")
        except PoolError as e:
            # A host out of reach: its agent, cut off from the server, stops itself once
            # it hears back (its worker is no longer live) or after ORPHAN_TIMEOUT.
            log.warning("worker on host %s not stopped: %s", host.text, e)
            where = Path(str(handle.get("dir", "")))
            with self._lock:
                self._not_stopped.setdefault(where.parent.name, []).append(
                    f"host {host.text}: the agent of worker {where.name.removeprefix('worker-')} "
                    f"(pid {pid}) was not stopped ({e}); it stops by itself within "
                    f"{defaults.ORPHAN_TIMEOUT / 60:.0f} minutes of losing the server, or stop "
                    "it there"
                )
            stopped = False
        else:
            stopped = True
        seen = self._seen[host.text]
        with seen.lock:
            if stopped:
                # Dead now, whatever a read that started before the kill comes back with.
                seen.stopped.add((int(pid), str(start)))
            seen.at = 0.0  # the next liveness check reads /proc again

    def remove(self, pool: str, home: Home) -> list[str]:
        self._use_home(home)
        root = self._remote_home(self.ssh.remote_dir, home)
        script = (
            f"rm -rf {shipping.remote_path(f'{root}/pools/{pool}')}; "
            f"rmdir {shipping.remote_path(f'{root}/pools')} {shipping.remote_path(root)} "
            f"{shipping.remote_path(self.ssh.remote_dir)} 2>/dev/null; true"
        )

        def one(host: Host) -> str | None:
            try:
                self._conn(host).run(script, timeout=120, what="removing the pool's files")
            except PoolError as e:
                log.warning("pool %s: files on host %s not removed: %s", pool, host.text, e)
                return (
                    f"host {host.text}: {root}/pools/{pool} was not removed ({e}); remove it there"
                )
            return None

        with ThreadPoolExecutor(max_workers=min(16, len(self.hosts))) as ex:
            files = [m for m in ex.map(one, self.hosts) if m]
        with self._lock:
            self._pools.discard(pool)
            idle = not self._pools
            left = self._not_stopped.pop(pool, []) + files
        if idle:
            self.close()  # no pool left here: no tunnel or connection kept open
        return left

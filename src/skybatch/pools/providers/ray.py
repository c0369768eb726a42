"""The Ray provider: each worker is a detached Ray actor that runs one agent on its node.

::

    provider:
      type: ray
      address: auto            # or host:6379 (GCS), or ray://host:10001 (Ray Client)

The server connects to the cluster once (``ray.init`` in its own process, namespace
``skybatch``). Each worker is an actor named after the deployment, pool and worker id,
detached so that it outlives the server's connection: a restarted server finds it
again by the name in its handle. The actor is placed with the pool's resources
(``cpus`` → ``num_cpus``, ``accelerators: L4:1`` → ``num_gpus=1`` plus a sliver of the
node resource ``accelerator_type:L4``, ``memory`` GB → ``memory``) and starts
``python -m skybatch.agent`` beside it on its node, which then pulls from the server
like any other agent. An actor without GPUs runs its agent with ``CUDA_VISIBLE_DEVICES``
empty (unless the pool's ``envs`` set it): Ray leaves it unset, which shows every GPU of
the node. The token (and the server's certificate) reach the agent as an
actor-method argument and then its stdin: never in options, names, environments or
command lines, which Ray shows in its logs and dashboard.

`pool apply` refuses a pool whose workers the cluster's nodes could never hold all at
once (each node packed by its total resources); one that fits but finds the cluster busy
waits at most ``PLACE_TIMEOUT`` per worker.

Ray's own restarts are off (``max_restarts=0``): a dead actor is a lost worker to the
server, which re-leases its batches at once and launches a replacement.

Nodes do not share the server's files (``shares_files = False``): the agents run with
``SKYBATCH_RELAY=1``, ``workdir`` travels with the launch, and each node keeps its
workers' directories and agent logs under ``~/.skybatch-ray/<deployment>/``, in the home
of the user Ray runs as. Not under ``/tmp``, where anyone can make that directory first,
nor in Ray's session directory, which Ray makes writable by all (0777): every level is
made 0700, and one that is someone else's or writable by others is refused.

The actor marks itself not dumpable before the token reaches it (the mapper runs as the
same user), and keeps it only until it is written to the agent's stdin. The agent is
started without the worker's directory ahead of its own imports: a file there named
like a module it uses is never run in place of it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import ipaddress
import logging
import math
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import field_validator

from skybatch.config import Home, forbid_inspection, open_private
from skybatch.errors import PoolError, PoolSpecError
from skybatch.pools import gpus
from skybatch.pools.providers.base import Provider, WorkerLaunch
from skybatch.pools.registry import ProviderConfig
from skybatch.pools.spec import PoolSpec
from skybatch.version import __version__

__all__ = ["RayConfig", "RayProvider"]

# `ray` itself is imported on first use (a quarter second or more): the client validates pool
# YAML through this module. A missing one is reported now, as the registry's install hint.
if importlib.util.find_spec("ray") is None:
    raise ModuleNotFoundError("No module named 'ray'", name="ray")

log = logging.getLogger("skybatch.server")

#: The Ray namespace of every skybatch actor (names are unique within it).
NAMESPACE = "skybatch"
#: How long a launch waits for its actor to be placed and its agent started: well under
#: the client's request timeout (client/api.py), so that `pool apply` on a busy cluster
#: ends in this launch's error, not in a timeout that names nothing.
PLACE_TIMEOUT = 60.0
#: One liveness round trip; a slower answer counts as alive (the lease expiry still
#: catches a worker that stopped working), a dead actor answers at once.
ALIVE_TIMEOUT = 5.0
#: ``workdir`` travels inside the launch: a bound on what is worth sending that way.
WORKDIR_LIMIT = 64 * 1024 * 1024
#: Of the per-node ``accelerator_type:<type>`` resource (1 on a node with that type):
#: what one worker takes, so that any number of workers fit beside each other.
_ACCEL_SHARE = 0.001

_ADDRESS = re.compile(r"^(auto|ray://[^\s:/]+:(\d{1,5})|[^\s:/]+:(\d{1,5}))$")


class RayConfig(ProviderConfig):
    """``provider: {type: ray, address: ...}``: the cluster's address, ``auto`` by default
    (``RAY_ADDRESS``, else the cluster started on this machine)."""

    type: Literal["ray"] = "ray"
    address: str = "auto"

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        match = _ADDRESS.match(value)
        if not match:
            raise ValueError(
                f"expected auto, HOST:PORT (the head's GCS, port 6379 by default) or "
                f"ray://HOST:PORT (Ray Client, port 10001), got {value!r}"
            )
        port = match.group(2) or match.group(3)
        if port is not None and not 1 <= int(port) <= 65535:
            # A socket would take it modulo 2**16 and quietly reach another port.
            raise ValueError(f"port {int(port)} of {value!r} is not between 1 and 65535")
        return value


# -- the connection (one per server process) -----------------------------------------------

_connection_lock = threading.Lock()
_connected_to: str | None = None


def _ray() -> Any:
    import ray

    return ray


def _probe(address: str) -> None:
    """A TCP connect to the head first: ray.init on a dead address retries for a minute."""
    if address == "auto":
        return
    host, port = address.removeprefix("ray://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise PoolSpecError(
            f"provider.address: cannot reach the Ray cluster at {address} ({reason}); "
            "start it (`ray start --head`) or fix the address"
        ) from None


def _connect(address: str) -> Any:
    """The ``ray`` module, connected to ``address`` (once per server process)."""
    global _connected_to
    ray = _ray()
    with _connection_lock:
        if _connected_to is not None and ray.is_initialized():
            if _connected_to != address:
                raise PoolSpecError(
                    f"provider.address: this server already uses the Ray cluster at "
                    f"{_connected_to}; one server works with one Ray cluster, so give "
                    f"{address!r}'s pools a server of their own (another SKYBATCH_HOME)"
                )
            return ray
        _probe(address)
        try:
            ray.init(
                address=address,
                namespace=NAMESPACE,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PoolSpecError(
                f"provider.address: cannot connect to the Ray cluster at {address}: {first}"
            ) from None
        _connected_to = address
        return ray


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- what a worker asks of a node ----------------------------------------------------------


def _number(amount: str | None) -> float | None:
    return float(amount.rstrip("+")) if amount else None


def _demand(spec: PoolSpec) -> dict[str, float]:
    """One worker's Ray resources, keyed as Ray's nodes report them."""
    res = spec.resources
    demand = {"CPU": _number(res.cpus) or 1.0}
    memory = _number(res.memory)
    if memory:
        demand["memory"] = memory * 1e9
    if res.accelerators:
        kind, count = res.accelerators.split(":")
        demand["GPU"] = float(count)
        demand[f"accelerator_type:{kind}"] = _ACCEL_SHARE
    return demand


def _actor_options(demand: dict[str, float]) -> dict[str, Any]:
    custom = {k: v for k, v in demand.items() if k.startswith("accelerator_type:")}
    options: dict[str, Any] = {"num_cpus": demand["CPU"], "num_gpus": demand.get("GPU", 0)}
    if "memory" in demand:
        options["memory"] = int(demand["memory"])
    if custom:
        options["resources"] = custom
    return options


_FIELDS = {
    "CPU": "resources.cpus",
    "GPU": "resources.accelerators",
    "memory": "resources.memory",
}


def _shown(resource: str, amount: float) -> str:
    if resource == "memory":
        return f"{amount / 1e9:g} GB memory"
    if resource.startswith("accelerator_type:"):
        return resource
    return f"{amount:g} {resource}"


def _fits(total: dict[str, float], demand: dict[str, float], resource: str | None = None) -> int:
    """How many workers a node of these total resources holds (only as far as
    ``resource`` goes, if given). The slack absorbs float error: Ray counts in 1e-4."""
    keys = [resource] if resource else list(demand)
    return min(math.floor(total.get(k, 0) / demand[k] + 1e-6) for k in keys)


#: Which resource a refusal names when several run out together: the scarcer kinds first.
_BLAME_ORDER = ("GPU", "memory", "CPU")


def _capacity(demand: dict[str, float], totals: list[dict[str, float]]) -> tuple[int, str]:
    """How many workers the nodes hold together (each node packed by its total resources),
    and the resource that bounds that number."""
    holding = [t for t in totals if _fits(t, demand) > 0]
    count = sum(_fits(t, demand) for t in holding)
    ranked = sorted(
        demand,
        key=lambda k: (
            sum(_fits(t, demand, k) for t in holding),
            _BLAME_ORDER.index(k) if k in _BLAME_ORDER else len(_BLAME_ORDER),
        ),
    )
    return count, ranked[0]


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _fit_error(
    address: str, demand: dict[str, float], nodes: list[dict[str, Any]], workers: int = 1
) -> str | None:
    """Why the cluster's nodes can never hold ``workers`` workers, or None."""
    live = sorted(
        (str(n.get("NodeName") or n.get("NodeManagerAddress")), n.get("Resources", {}))
        for n in nodes
        if n.get("Alive")
    )
    totals = [t for _, t in live]
    if not totals:
        return f"provider.address: the Ray cluster at {address} has no live node"
    offered = "; ".join(
        f"{name}: " + (", ".join(_shown(k, t.get(k, 0)) for k in demand if t.get(k, 0)) or "none")
        for name, t in live
    )
    if any(_fits(t, demand) > 0 for t in totals):
        count, bound = _capacity(demand, totals)
        if count >= workers:
            return None
        wanted = ", ".join(_shown(k, v) for k, v in demand.items())
        return (
            f"{_FIELDS.get(bound, 'resources.accelerators')}: the Ray cluster at {address} "
            f"holds {_plural(count, 'worker')} of this size ({wanted}), not the pool's "
            f"{workers} (its nodes offer: {offered}); ask for fewer workers or less, or add nodes"
        )
    for resource, amount in demand.items():
        if not any(t.get(resource, 0) >= amount for t in totals):
            field = _FIELDS.get(resource, "resources.accelerators")
            return (
                f"{field}: no node of the Ray cluster at {address} has {_shown(resource, amount)} "
                f"for one worker (its nodes offer: {offered}); ask for less or add such a node"
            )
    wanted = ", ".join(_shown(k, v) for k, v in demand.items())
    return (
        f"resources: no node of the Ray cluster at {address} has {wanted} together for one "
        f"worker (its nodes offer: {offered}); ask for less or add such a node"
    )


def _free(ray: Any, demand: dict[str, float]) -> str:
    """What the cluster has free now, of the resources a worker asks for."""
    try:
        free = ray.available_resources()
    except Exception:  # the error it explains must still come out
        return "(unknown)"
    shown = [_shown(k, free.get(k, 0)) for k in demand if not k.startswith("accelerator_type:")]
    return ", ".join(shown)


def _pack(workdir: str | None) -> bytes | None:
    """``workdir`` as a gzipped tar, to travel with the launch."""
    if not workdir:
        return None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(workdir, arcname=".")
    data = buffer.getvalue()
    if len(data) > WORKDIR_LIMIT:
        raise PoolSpecError(
            f"workdir: {workdir} packs to {len(data) // 2**20} MiB, more than the "
            f"{WORKDIR_LIMIT // 2**20} MiB a Ray worker receives with its launch; keep data "
            "out of the workdir (read it from storage in the mapper)"
        )
    return data


# -- on the node ---------------------------------------------------------------------------


#: Under the home directory of the user Ray runs as: see the module's docstring.
NODE_HOMES = ".skybatch-ray"


def _node_home(deployment: str) -> Home:
    """This node's home for a deployment's workers (their directories and agent logs)."""
    return Home(Path.home() / NODE_HOMES / deployment)


def _where() -> str:
    return f"on Ray node {socket.gethostname()}"


def _check_ancestor(path: Path, inside: Path) -> None:
    """Refuse a directory above the node home that someone else could swap it out of."""
    st = path.stat()
    if st.st_uid not in (os.getuid(), 0):
        raise PoolError(
            f"{inside} {_where()} lies inside {path}, which uid {st.st_uid} owns, not the "
            f"user Ray runs as (uid {os.getuid()}); give that user a home directory of its own"
        )
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise PoolError(
            f"{inside} {_where()} lies inside {path}, which anyone can write (mode "
            f"{stat.S_IMODE(st.st_mode):04o}, not sticky); give the user Ray runs as a home "
            "directory of its own"
        )


def _private_problem(path: Path) -> str | None:
    """Why the existing ``path`` is not a directory of ours alone, or None."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return f"{path} {_where()} is not a directory (a symbolic link?); remove it"
    if st.st_uid != os.getuid():
        return (
            f"{path} {_where()} is owned by uid {st.st_uid}, not the user Ray runs as "
            f"(uid {os.getuid()}), so files in it may be someone else's; remove it"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"{path} {_where()} is writable by others (mode {mode:04o}), so files in it may "
            "be someone else's; remove it"
        )
    return None


def _private_dir(path: Path) -> None:
    """Make ``path`` (0700) or accept it only if it is ours and no one else can write it:
    ``mkdir``'s mode binds neither a directory that exists nor the parents it makes."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise PoolError(
            f"cannot make {path} {_where()} ({e.strerror}); give the user Ray runs as a "
            "home directory it can write"
        ) from None
    problem = _private_problem(path)
    if problem:
        raise PoolError(problem)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)


def _prepare_node_home(deployment: str, pool: str, index: int) -> Home:
    """The node home with the worker's directory and log directory, each level ours alone."""
    try:
        home = _node_home(deployment)
    except RuntimeError:  # no HOME, and no passwd entry
        home = Home(Path(NODE_HOMES))
    if not home.root.is_absolute():
        raise PoolError(
            f"the user Ray runs as {_where()} has no home directory (HOME="
            f"{os.environ.get('HOME', '')!r}); set HOME for the Ray nodes"
        )
    top = home.root.parent
    for ancestor in reversed(top.parents):
        if ancestor.exists():
            _check_ancestor(ancestor, home.root)
    if not top.parent.is_dir():
        raise PoolError(
            f"cannot make {home.root} {_where()}: {top.parent} does not exist; give the user "
            "Ray runs as a home directory"
        )
    levels = [top, home.root]
    for below in (home.worker_dir(pool, index), home.worker_log(pool, index).parent):
        inside = below.relative_to(home.root)
        levels += [home.root / p for p in reversed(inside.parents) if p != Path(".")]
        levels.append(below)
    for level in dict.fromkeys(levels):
        _private_dir(level)
    return home


#: Run as ``python -I -c`` (isolated: the worker's directory, its cwd, is not on its
#: path): the agent gets SIGKILL when the thread that started it ends, which for a
#: killed actor is at once (PR_SET_PDEATHSIG survives the exec).
_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "parent = int(sys.argv[1])\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != parent: os._exit(1)\n"
    "os.execv(sys.executable, [sys.executable, '-c', sys.argv[2]])\n"
)

#: The agent, as ``python -m skybatch.agent`` but with its cwd (the worker's directory)
#: last on its path, not first: nothing there shadows a module the agent imports, while a
#: custom reader or writer class from a workdir module still imports by name, as on a
#: local pool (io/custom.py). ``-P`` would drop it altogether, and Python 3.10 lacks it.
_AGENT = (
    "import sys\n"
    "if sys.path[:1] == ['']: del sys.path[0]\n"
    "import os, runpy\n"
    "sys.path.append(os.getcwd())\n"
    "runpy.run_module('skybatch.agent', run_name='__main__', alter_sys=True)\n"
)


class WorkerActor:
    """The body of a worker's actor: starts its agent, says whether it runs, stops it."""

    def __init__(self) -> None:
        # Before ``start`` brings the token: the mapper runs as this user, and could
        # otherwise read it out of /proc/<actor>/mem as the agent's parent.
        forbid_inspection()
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = threading.Event()
        self._failed: BaseException | None = None

    def start(
        self,
        token: str,
        cert: str | None,
        env: dict[str, str],
        deployment: str,
        pool: str,
        index: int,
        workdir: bytes | None,
    ) -> dict[str, Any]:
        """Start the agent (once); where it runs. ``token`` goes to its stdin, nowhere else."""
        ray = _ray()
        home = _prepare_node_home(deployment, pool, index)
        worker_dir = home.worker_dir(pool, index)
        if workdir:
            with tarfile.open(fileobj=io.BytesIO(workdir), mode="r:gz") as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(worker_dir, filter="data")
                else:  # pragma: no cover - Pythons before the filters
                    tar.extractall(worker_dir)
            os.chmod(worker_dir, 0o700)  # the archive's "." carries the workdir's mode
        log_path = home.worker_log(pool, index)
        full_env = {k: v for k, v in os.environ.items() if k != "SKYBATCH_TOKEN"}
        full_env.update(env)
        full_env["SKYBATCH_HOME"] = str(home.root)
        if self._proc is None:
            # Started by a thread of its own that lives as long as the agent: the kernel
            # signals the agent when that thread ends, not when the actor's process does.
            # The token stays out of that thread's arguments, which live as long.
            threading.Thread(
                target=self._run,
                args=(full_env, worker_dir, log_path),
                name="skybatch-agent",
                daemon=True,
            ).start()
            self._started.wait(60)
            if self._proc is not None and self._proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self._proc.stdin.write(token.encode() + b"\n")
                    self._proc.stdin.write(cert.encode() if cert else b"")
                    self._proc.stdin.close()
        if self._failed is not None:
            raise self._failed
        assert self._proc is not None
        gpu_ids = [int(g) if str(g).isdigit() else g for g in ray.get_gpu_ids()]
        return {
            "pid": self._proc.pid,
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpus": gpu_ids,
            "dir": str(worker_dir),
            "version": __version__,
        }

    def _run(self, env: dict[str, str], cwd: Path, log_path: Path) -> None:
        try:
            with os.fdopen(open_private(log_path, os.O_APPEND), "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _WITH_PARENT, str(os.getpid()), _AGENT],
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a stop reaches whatever the agent started
                )
            self._proc = proc
        except BaseException as e:
            self._failed = e
            return
        finally:
            self._started.set()
        proc.wait()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _remove_pool_dir(deployment: str, pool: str) -> None:
    home = _node_home(deployment)
    try:
        trusted = _private_problem(home.root) is None
    except OSError:
        return  # no home on this node: nothing to remove
    if trusted:  # never into a home someone else could have filled
        shutil.rmtree(home.pool_dir(pool), ignore_errors=True)


# -- the provider --------------------------------------------------------------------------


class RayProvider(Provider):
    """Workers are detached actors on a Ray cluster, each running one agent on its node."""

    config_model: ClassVar[type[ProviderConfig]] = RayConfig
    shares_files: ClassVar[bool] = False

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        assert isinstance(config, RayConfig)
        self.address = config.address
        self._actor_class: Any = None
        self._cleanup: Any = None
        self._actors: dict[str, Any] = {}
        self._lock = threading.Lock()

    # -- connection --------------------------------------------------------------------

    def _ray(self) -> Any:
        ray = _connect(self.address)
        with self._lock:
            if self._actor_class is None:
                self._actor_class = ray.remote(WorkerActor)
                self._cleanup = ray.remote(_remove_pool_dir)
        return ray

    def _prefix(self, pool: str, home: Home | None = None) -> str:
        home = home or (self.access.home if self.access else None)
        if home is None:
            raise PoolError("the Ray provider was used before the server attached it")
        # ':' appears in no pool name, so one pool's prefix never matches another's.
        return f"skybatch:{home.deployment_id()}:{pool}:"

    def check(self, spec: PoolSpec, held: Any = None) -> None:
        ray = self._ray()
        nodes = ray.nodes()
        # Against the nodes' totals, not what is free now: other tenants come and go,
        # and this pool's own live actors hold part of what it asks for.
        problem = _fit_error(self.address, _demand(spec), nodes, spec.pool.high)
        problem = problem or self._unreachable(nodes)
        if problem:
            raise PoolSpecError(problem)
        _pack(spec.workdir)

    def _unreachable(self, nodes: list[dict[str, Any]]) -> str | None:
        """Why agents on some node could not reach a loopback server, or None."""
        url = self.access.url if self.access else ""
        host = urlsplit(url).hostname or ""
        if not host or not _is_loopback(host):
            return None
        import psutil

        mine = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
        away = sorted(
            f"{n.get('NodeName')} ({n.get('NodeManagerAddress')})"
            for n in nodes
            if n.get("Alive") and n.get("NodeManagerAddress") not in mine
        )
        if not away:
            return None
        return (
            f"provider: nodes of the Ray cluster at {self.address} run on other machines "
            f"({', '.join(away)}), whose agents cannot reach this server at {url}; restart it "
            "on an address they reach: `skybatch server stop`, then "
            "`skybatch server start --host ADDR` (served over HTTPS)"
        )

    def close(self) -> None:
        global _connected_to
        with _connection_lock:
            if _connected_to is None:
                return
            # Detached actors (and their agents) live on; the next server finds them.
            with contextlib.suppress(Exception):
                _ray().shutdown()
            _connected_to = None
        self._actors.clear()

    # -- workers -----------------------------------------------------------------------

    def launch(self, worker: WorkerLaunch) -> dict[str, Any]:
        ray = self._ray()
        name = f"{self._prefix(worker.pool, worker.home)}{worker.worker_id}"
        demand = _demand(worker.spec)
        # Packed before the actor exists: a workdir gone since `pool apply` must not
        # leave a detached actor behind holding a node's resources.
        workdir = _pack(worker.spec.workdir)
        actor = self._actor_class.options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            max_restarts=0,
            max_task_retries=0,
            # alive() must answer while stop() waits out its grace.
            max_concurrency=4,
            **_actor_options(demand),
        ).remote()
        env = dict(worker.spec.envs)
        if "GPU" not in demand and "CUDA_VISIBLE_DEVICES" not in env:
            # Ray leaves CUDA_VISIBLE_DEVICES unset for an actor without GPUs, which would
            # show the mapper every GPU of its node: hide them, as a local pool does.
            env = {**gpus.cuda_env([]), **env}
        env.update(
            SKYBATCH_SERVER_URL=worker.server_url,
            SKYBATCH_WORKER_ID=str(worker.worker_id),
            SKYBATCH_WORKER_INDEX=str(worker.index),
            SKYBATCH_RELAY="1",
            PYTHONUNBUFFERED="1",
        )
        started = actor.start.remote(
            worker.token,
            worker.server_cert,
            env,
            worker.home.deployment_id(),
            worker.pool,
            worker.index,
            workdir,
        )
        try:
            info = ray.get(started, timeout=PLACE_TIMEOUT)
        except Exception as e:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            raise PoolError(self._launch_error(e, demand, worker.spec.pool.high)) from None
        with self._lock:
            self._actors[name] = actor
        if info["version"] != __version__:
            self.terminate({"actor": name}, 5.0)
            raise PoolError(
                f"the Ray node runs skybatch {info['version']}, this server {__version__}; "
                f"install skybatch=={__version__} on every node of the Ray cluster"
            )
        return {
            "actor": name,
            "host": self._node_name(ray, info["node_id"]),
            "node_id": info["node_id"],
            "gpus": info["gpus"],
            "pid": info["pid"],
            "dir": info["dir"],
        }

    def _launch_error(self, error: BaseException, demand: dict[str, float], workers: int) -> str:
        ray = _ray()
        if isinstance(error, ray.exceptions.GetTimeoutError):
            wanted = ", ".join(_shown(k, v) for k, v in demand.items())
            return (
                f"no node of the Ray cluster at {self.address} had room for a worker "
                f"({wanted}) within {PLACE_TIMEOUT:.0f}s; the pool asks for "
                f"{_plural(workers, 'worker')} of this size, the cluster has free "
                f"{_free(ray, demand)}; free resources there (other tenants hold them) or "
                "ask for fewer workers"
            )
        cause = getattr(error, "cause", None)
        if isinstance(cause, PoolError):  # raised by the actor: says what to do, in one line
            return str(cause)
        text = str(error)
        if "No module named 'skybatch" in text:
            return (
                f"the nodes of the Ray cluster at {self.address} cannot import skybatch; "
                f"install skybatch=={__version__} on every node"
            )
        last = [line for line in text.strip().splitlines() if line.strip()]
        return f"the Ray actor of the worker failed to start: {last[-1] if last else error!r}"

    @staticmethod
    def _node_name(ray: Any, node_id: str) -> str:
        for node in ray.nodes():
            if node.get("NodeID") == node_id:
                return str(node.get("NodeName") or node.get("NodeManagerAddress") or node_id)
        return node_id

    def _actor(self, name: str) -> Any:
        """The actor called ``name``, or None if it is gone."""
        with self._lock:
            actor = self._actors.get(name)
        if actor is not None:
            return actor
        ray = self._ray()
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None
        with self._lock:
            self._actors[name] = actor
        return actor

    def is_alive(self, handle: dict[str, Any]) -> bool:
        name = handle.get("actor")
        if not name:
            return False
        try:
            ray = self._ray()
        except PoolSpecError as e:
            # The cluster is gone, and its actors with it: the relaunch says why.
            log.warning("worker %s: %s", name, e)
            return False
        actor = self._actor(name)
        if actor is None:
            return False
        try:
            return bool(ray.get(actor.alive.remote(), timeout=ALIVE_TIMEOUT))
        except ray.exceptions.RayActorError:
            with self._lock:
                self._actors.pop(name, None)
            return False
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            return True

    def terminate(self, handle: dict[str, Any], grace: float) -> None:
        name = handle.get("actor")
        if not name:
            return
        try:
            ray = self._ray()
        except PoolSpecError as e:
            log.warning("cannot stop worker %s: %s", name, e)  # its cluster is gone
            return
        actor = self._actor(name)
        if actor is None:
            return
        with contextlib.suppress(Exception):
            ray.get(actor.stop.remote(grace), timeout=grace + 10)
        self._kill(ray, name, actor)

    def _kill(self, ray: Any, name: str, actor: Any) -> None:
        """Kill the actor and wait (bounded) until Ray reports it dead: `pool down`
        returns once its actors are gone, not while their processes still exit."""
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                ray.get(actor.alive.remote(), timeout=1)
            except ray.exceptions.RayActorError:
                break
            except Exception:
                pass
            time.sleep(0.05)
        with self._lock:
            self._actors.pop(name, None)

    def remove(self, pool: str, home: Home) -> list[str]:
        try:
            ray = self._ray()
        except PoolSpecError as e:
            log.warning("cannot remove pool %s from its Ray cluster: %s", pool, e)
            return [
                f"the pool's actors were not removed ({e}); remove them there "
                f"(`ray list actors`, names starting {self._prefix(pool, home)!r})"
            ]
        prefix = self._prefix(pool, home)
        for name in ray.util.list_named_actors():
            if isinstance(name, str) and name.startswith(prefix):
                actor = self._actor(name)
                if actor is not None:
                    self._kill(ray, name, actor)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        deployment = home.deployment_id()
        cleanups = [
            self._cleanup.options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            ).remote(deployment, pool)
            for node in ray.nodes()
            if node.get("Alive")
        ]
        with contextlib.suppress(Exception):
            ray.get(cleanups, timeout=30)
        return []

"""The local provider: one agent process per worker on this machine."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import psutil

from skybatch.config import Home
from skybatch.errors import PoolError, PoolSpecError
from skybatch.pools import gpus
from skybatch.pools.providers.base import Provider, WorkerLaunch
from skybatch.pools.registry import ProviderConfig
from skybatch.pools.spec import PoolSpec, mount_target

__all__ = ["HOST", "LocalConfig", "LocalProvider", "copy_mount"]

#: The host local workers run on, as handles and `pool status` name it (and the
#: GPU ledger keys it).
HOST = "localhost"


def copy_mount(source: Path, target: Path) -> None:
    """One ``file_mounts`` entry: a directory's contents into ``target``, a file as it."""
    if not source.exists():
        raise PoolError(f"file_mounts: {source} does not exist any more; apply the pool again")
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True, symlinks=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


class LocalConfig(ProviderConfig):
    """``provider: local`` takes no fields: workers run on the server's machine."""

    type: Literal["local"] = "local"


#: The variables numeric libraries (OpenMP: torch, numpy's BLAS) size their thread pools by.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_env(env: dict[str, str], workers: int) -> dict[str, str]:
    """The machine's cores shared among the pool's workers for their numeric libraries'
    threads, unless the pool's envs (or the server's environment) set them: left alone,
    each worker's torch takes every core and ``workers`` of them fight over each one."""
    share = str(max(1, (os.cpu_count() or 1) // max(1, workers)))
    return {name: share for name in THREAD_VARIABLES if name not in env}


class LocalProvider(Provider):
    """Workers are agent processes, each in its own session and working directory."""

    config_model: ClassVar[type[ProviderConfig]] = LocalConfig

    def __init__(self, config: ProviderConfig | None = None) -> None:
        super().__init__(config or LocalConfig())
        # Children of this server are reaped through their Popen; agents that
        # outlived a previous server are found again by pid and start time.
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def check(self, spec: PoolSpec, held: gpus.Held | None = None) -> None:
        if spec.resources.accelerators is None:
            return
        try:
            present = gpus.local_gpus()
        except PoolError as e:
            raise PoolSpecError(f"{e}; the pool asks for {spec.resources.accelerators}") from None
        taken = (held or gpus.Held()).on(HOST, present)
        gpus.check_fits(present, taken, spec.resources.accelerators, spec.workers, "this machine")

    def _place(self, worker: WorkerLaunch) -> list[gpus.Gpu]:
        accelerators = worker.spec.resources.accelerators
        if accelerators is None:
            return []
        where = "this machine"
        return worker.gpus.claim(
            worker.worker_id, worker.pool, HOST, gpus.local_gpus(where), accelerators, where
        )

    def launch(self, worker: WorkerLaunch) -> dict[str, Any]:
        chosen = self._place(worker)
        placed = [g.index for g in chosen]
        workdir = worker.home.worker_dir(worker.pool, worker.index)
        workdir.mkdir(parents=True, exist_ok=True)
        if worker.spec.workdir:
            shutil.copytree(worker.spec.workdir, workdir, dirs_exist_ok=True, symlinks=True)
        for target, source in worker.spec.file_mounts.items():
            copy_mount(Path(source), workdir / mount_target(target))
        log = worker.home.worker_log(worker.pool, worker.index)
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # A pool without accelerators sees no GPU, unless its envs say otherwise: its
        # mapper must not land on GPUs that another pool's workers hold.
        env.update(gpus.cuda_env(placed))
        env.update(worker.spec.envs)
        if placed:
            env.update(gpus.cuda_env(placed))  # what was placed wins over the envs
        env.update(thread_env(env, worker.spec.workers))
        env.pop("SKYBATCH_TOKEN", None)
        env.update(
            SKYBATCH_HOME=str(worker.home.root),
            SKYBATCH_SERVER_URL=worker.server_url,
            SKYBATCH_WORKER_ID=str(worker.worker_id),
            SKYBATCH_WORKER_INDEX=str(worker.index),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.agent_env(worker))
        log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(log_fd, "ab") as out:
            # The token goes down a pipe, not the environment: /proc/<agent>/environ is
            # readable by every process of our user, the mapper's included.
            proc = subprocess.Popen(
                [*self.agent_prefix(worker), sys.executable, "-m", "skybatch.agent"],
                cwd=workdir,
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        assert proc.stdin is not None
        try:
            proc.stdin.write(worker.token.encode() + b"\n")
            proc.stdin.close()
        except OSError:
            pass  # it died at once; the monitor sees it gone
        with self._lock:
            self._children[proc.pid] = proc
        try:
            created = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            created = 0.0
        return {
            "pid": proc.pid,
            "create_time": created,
            "dir": str(workdir),
            "host": HOST,
            "gpus": placed,
            "gpu_uuids": [g.uuid for g in chosen],
        }

    def agent_env(self, worker: WorkerLaunch) -> dict[str, str]:
        """Variables a subclass adds to the agent's environment (the test provider's relay)."""
        return {}

    def agent_prefix(self, worker: WorkerLaunch) -> list[str]:
        """A command the agent runs under (exec'ing it, so its pid is the agent's)."""
        return []

    def is_alive(self, handle: dict[str, Any]) -> bool:
        return self._running(handle)

    def _running(self, handle: dict[str, Any]) -> bool:
        pid = handle.get("pid")
        if not pid:
            return False
        with self._lock:
            child = self._children.get(pid)
        if child is not None:
            if child.poll() is None:
                return True
            with self._lock:
                self._children.pop(pid, None)
            return False
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - handle.get("create_time", 0)) > 1:
                return False  # the pid was reused by another process
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def terminate(self, handle: dict[str, Any], grace: float) -> None:
        pid = handle.get("pid")
        if not pid or not self._running(handle):
            return
        # The agent leads its own session: the signal reaches its runners too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._running(handle):
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with self._lock:
            child = self._children.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)

    def remove(self, pool: str, home: Home) -> list[str]:
        shutil.rmtree(home.pool_dir(pool), ignore_errors=True)
        return []

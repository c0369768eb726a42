"""A real two-node Ray cluster for the tests, started with ``ray start`` and stopped by PID.

The head offers 2 CPUs; the second node 1 CPU, 1 GPU and ``accelerator_type:L4`` (Ray
takes declared resources at their word, so no GPU is needed). Both run on this machine:
a server on 127.0.0.1 stays within the agents' reach. Their HOME is a directory of the
cluster's own, where the Ray provider keeps its node homes. (Ray turns
``--node-ip-address 127.0.0.1`` into this machine's address; its ports are this
machine's alone for the cluster's life.) Every process of the cluster is stopped by its
process group, never by ``ray stop`` (which kills by name), and checked gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.helpers import wait_for

__all__ = ["RAY", "RayCluster", "cmdline", "free_port", "ray_cluster"]

RAY = shutil.which("ray", path=os.path.dirname(sys.executable))


@dataclass
class RayCluster:
    address: str
    temp: Path  # Ray's session files (its logs)
    nodes_tmp: Path  # TMPDIR of the nodes (it finds the agents)
    nodes_home: Path  # HOME of the nodes: the agents' node homes lie under it
    starts: list[subprocess.Popen[bytes]]

    def processes(self) -> list[psutil.Process]:
        """Every live process of the cluster: the `ray start` processes' descendants,
        and the agents, which lead sessions of their own (found by their TMPDIR)."""
        found: dict[int, psutil.Process] = {}
        for start in self.starts:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(start.pid)
                for p in [root, *root.children(recursive=True)]:
                    found[p.pid] = p
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.environ().get("TMPDIR") == str(self.nodes_tmp):
                    found[p.pid] = p
        live = []
        for p in found.values():
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    live.append(p)
        return live

    def actors(self) -> list[psutil.Process]:
        return [p for p in self.processes() if cmdline(p).startswith("ray::WorkerActor")]

    def node_home(self, deployment: str) -> Path:
        """Where the nodes keep a deployment's worker directories and agent logs (the Ray
        provider's ``~/.skybatch-ray/<deployment>``)."""
        return self.nodes_home / ".skybatch-ray" / deployment


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


@contextlib.contextmanager
def ray_cluster() -> Iterator[RayCluster]:
    """The two nodes, started; every process of theirs gone afterwards."""
    assert RAY, "the ray command is missing: pip install 'skybatch[ray]'"
    # Ray's socket paths must stay under 108 bytes: a short directory, not pytest's.
    root = Path(tempfile.mkdtemp(prefix="sbray-", dir="/tmp"))
    temp = root / "ray"
    nodes_tmp = root / "nodes"
    nodes_tmp.mkdir()
    nodes_home = root / "home"
    nodes_home.mkdir(mode=0o700)
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(nodes_tmp)}
    env["HOME"] = str(nodes_home)
    env.pop("RAY_ADDRESS", None)
    common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    common += ["--object-store-memory", str(80 * 10**6)]
    starts: list[subprocess.Popen[bytes]] = []
    cluster = RayCluster(f"127.0.0.1:{port}", temp, nodes_tmp, nodes_home, starts)
    try:
        for name, extra in (
            (
                "head",
                [
                    *("--head", "--port", str(port), "--num-cpus", "2"),
                    *("--temp-dir", str(temp), "--include-dashboard", "false"),
                ],
            ),
            (
                "gpu",
                [
                    *("--address", cluster.address, "--num-cpus", "1", "--num-gpus", "1"),
                    *("--resources", json.dumps({"accelerator_type:L4": 1})),
                ],
            ),
        ):
            log = root / f"{name}.log"
            with open(log, "wb") as out:
                starts.append(
                    subprocess.Popen(
                        [RAY, "start", *extra, *common, "--node-name", name],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )

            def started(log: Path = log, proc: subprocess.Popen[bytes] = starts[-1]) -> bool:
                assert proc.poll() is None, f"ray start exited: {log.read_text()[-2000:]}"
                return "Ray runtime started" in log.read_text()

            wait_for(started, timeout=90, message=f"the Ray node {name}")
        yield cluster
    finally:
        leftover = cluster.processes()
        _stop(starts)
        for p in leftover:  # anything that left the groups, by pid
            with contextlib.suppress(psutil.Error):
                p.kill()
        remaining = wait_for(
            lambda: not cluster.processes() or None, timeout=30, message="no Ray process left"
        )
        assert remaining
        shutil.rmtree(root, ignore_errors=True)

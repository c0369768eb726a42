"""The provider contract (tests/contract/test_providers.py) on the Ray provider, over a real
two-node Ray cluster (tests/e2e/ray_cluster.py) that this test process connects to as
a server would.

Both nodes run on this machine under one HOME, so a test sees the nodes' worker
directories, and finds its agents by pid: each one's SKYBATCH_HOME is the node home of
the test's deployment, which no other test's agent shares.

Below the contract, what protects the token on a node: the node home is the user's
alone, a file in the worker's directory is never imported by the agent, and the actor
keeps no copy of the token and cannot be read by a mapper of the same user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray

from skybatch.config import Home
from skybatch.errors import PoolError
from skybatch.pools.providers.base import Provider
from skybatch.pools.providers.ray import NAMESPACE, RayConfig, RayProvider
from tests.contract.test_providers import ProviderContract
from tests.e2e.ray_cluster import RayCluster, cmdline, ray_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    with ray_cluster() as started:
        try:
            yield started
        finally:
            # This process's connection (ray.init, made by the first provider call) goes
            # before the cluster does.
            RayProvider(RayConfig(address=started.address)).close()


class TestRayProvider(ProviderContract):
    @pytest.fixture
    def provider(self, cluster: RayCluster) -> Provider:
        self.cluster = cluster
        return RayProvider(RayConfig(address=cluster.address))

    def setup(self, provider: Provider, home: Home) -> None:
        provider.attach(self.access(home))

    def teardown(self, provider: Provider, home: Home) -> None:
        # Detached actors outlive their provider: a failed test's would hold the
        # cluster's CPUs from the next tests.
        provider.remove("p", home)

    def agents(self, home: Home) -> list[psutil.Process]:
        node_home = str(self.cluster.node_home(home.deployment_id()))
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):  # exiting meanwhile, or not ours
                if (
                    "skybatch.agent" in cmdline(proc)
                    and proc.status() != psutil.STATUS_ZOMBIE
                    and proc.environ().get("SKYBATCH_HOME") == node_home
                ):
                    found.append(proc)
        return found

    def pool_files(self, home: Home) -> Path | None:
        return self.cluster.node_home(home.deployment_id()) / "pools" / "p"

    def test_a_bad_spec_fails_cleanly(self, provider: Provider, home: Home, tmp_path: Path) -> None:
        super().test_a_bad_spec_fails_cleanly(provider, home, tmp_path)
        # Nor is an actor left behind to hold a node's CPU: detached, it would outlive
        # the failed launch.
        assert [n for n in ray.util.list_named_actors() if home.deployment_id() in n] == []

    # -- the token on the node -----------------------------------------------------------

    def test_the_node_home_is_ours_alone(self, provider: Provider, home: Home) -> None:
        handle = provider.launch(self.launch_spec(home))
        node_home = self.cluster.node_home(home.deployment_id())
        levels = [node_home.parent, node_home, node_home / "pools", node_home / "pools" / "p"]
        levels += [node_home / "pools" / "p" / "worker-0", node_home / "logs"]
        levels += [node_home / "logs" / "pools", node_home / "logs" / "pools" / "p"]
        for level in levels:
            st = level.lstat()
            assert (st.st_uid, oct(st.st_mode)) == (os.getuid(), oct(stat.S_IFDIR | 0o700)), level
        log = (node_home / "logs" / "pools" / "p" / "worker-0.log").stat()
        assert (log.st_uid, stat.S_IMODE(log.st_mode)) == (os.getuid(), 0o600)
        provider.terminate(handle, grace=5)

    @pytest.mark.parametrize("how", ["foreign", "open"])
    def test_a_node_home_someone_else_could_fill_is_refused(
        self, provider: Provider, home: Home, how: str
    ) -> None:
        # As another user of the node would leave it, before the pool's first worker.
        node_home = self.cluster.node_home(home.deployment_id())
        node_home.mkdir(parents=True, mode=0o700)
        if how == "foreign":
            os.chown(node_home, 65534, 65534)
            reason = (
                f"is owned by uid 65534, not the user Ray runs as (uid {os.getuid()}), so "
                "files in it may be someone else's"
            )
        else:
            os.chmod(node_home, 0o777)
            reason = "is writable by others (mode 0777), so files in it may be someone else's"
        with pytest.raises(PoolError) as e:
            provider.launch(self.launch_spec(home))
        where = f"on Ray node {socket.gethostname()}"
        assert str(e.value) == f"{node_home} {where} {reason}; remove it"
        assert list(node_home.iterdir()) == [] and self.agents(home) == []
        assert [n for n in ray.util.list_named_actors() if home.deployment_id() in n] == []

    def test_the_agent_imports_nothing_from_its_directory(
        self, provider: Provider, home: Home, tmp_path: Path
    ) -> None:
        # Modules the agent and the process that starts it import, lying in the worker's
        # directory (here by the workdir): each leaves a mark if it is ever imported.
        marks = tmp_path / "imported"
        marks.mkdir()
        workdir = tmp_path / "code"
        (workdir / "skybatch").mkdir(parents=True)
        planted = ["ctypes", "signal", "runpy", "json", "httpx", "sitecustomize"]
        for name in [*planted, "skybatch/__init__"]:
            mark = marks / name.replace("/", ".")
            (workdir / f"{name}.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
        # A server that only listens: the agent's first request shows that it got past its
        # imports and read the token from its stdin.
        with socket.create_server(("127.0.0.1", 0)) as server:
            url = f"http://127.0.0.1:{server.getsockname()[1]}"
            token = secrets.token_urlsafe(32)
            launch = self.launch_spec(home, yaml=f"pool: {{workers: 1}}\nworkdir: {workdir}\n")
            handle = provider.launch(dataclasses.replace(launch, server_url=url, token=token))
            server.settimeout(60)
            conn, _ = server.accept()
            with conn:
                conn.settimeout(30)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    assert chunk, f"the agent closed the connection after {head!r}"
                    head += chunk
        assert b"POST /v1/agent/workers/1/register " in head
        assert f"Bearer {token}".encode() in head
        assert sorted(p.name for p in marks.iterdir()) == []
        assert provider.is_alive(handle)
        provider.terminate(handle, grace=5)
        # The same files, for a Python started there as the agent was before: imported.
        worker_dir = Path(handle["dir"])
        subprocess.run([sys.executable, "-c", "import json"], cwd=worker_dir, check=True)
        assert sorted(p.name for p in marks.iterdir()) == ["json"]

    def test_the_actor_keeps_no_token_and_is_closed_to_its_user(
        self, provider: Provider, home: Home
    ) -> None:
        token = secrets.token_urlsafe(32)
        handle = provider.launch(dataclasses.replace(self.launch_spec(home), token=token))
        actor = ray.get_actor(handle["actor"], namespace=NAMESPACE)

        def probe(_: Any, halves: tuple[str, str]) -> tuple[int, list[str]]:
            # In the actor's process: whether it is dumpable (PR_GET_DUMPABLE), and which
            # live containers hold the token. Sent in halves, so this call's own arguments
            # do not count.
            import ctypes
            import gc

            text = "".join(halves)
            raw = text.encode()
            tracked = gc.get_objects()
            # Containers of atoms only (a tuple of bytes, say) leave the collector's
            # lists: found through what holds them.
            untracked = [
                r
                for o in tracked
                for r in gc.get_referents(o)
                if isinstance(r, (dict, list, tuple)) and not gc.is_tracked(r)
            ]
            holders = []
            for obj in tracked + untracked:
                if isinstance(obj, dict):
                    values = list(obj.values())
                elif isinstance(obj, (list, tuple)):
                    values = list(obj)
                else:
                    continue
                for v in values:
                    if (isinstance(v, str) and text in v) or (
                        isinstance(v, (bytes, bytearray)) and raw in v
                    ):
                        holders.append(f"{type(obj).__name__}: {str(obj)[:200]}")
            return ctypes.CDLL(None).prctl(3, 0, 0, 0, 0), holders

        halves = (token[:16], token[16:])
        dumpable, holders = ray.get(actor.__ray_call__.remote(probe, halves), timeout=30)
        assert (dumpable, holders) == (0, [])
        provider.terminate(handle, grace=5)

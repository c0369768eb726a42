"""Fixtures: real deployments (server and agent processes), stopped by PID afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from skybatch.client.api import close_clients
from skybatch.config import Home
from skybatch.server.daemon import read_server_info, stop_server
from tests.storage_servers import GcsServer, S3Server, fake_gcs, seaweedfs

REPO = Path(__file__).resolve().parent.parent

# gcsfs reads this when imported (by any process: the tests, the server, agents):
# without it every bucket of the GCS emulator hangs 60 s on a namespace probe.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def wait_for(
    condition: Callable[[], Any], timeout: float = 30.0, message: str = "condition"
) -> Any:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.05)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _kill_leftovers(home: Home) -> None:
    """Kill agents the server did not stop (a test killed the server, say), by PID."""
    if not home.db.exists():
        return
    try:
        db = sqlite3.connect(str(home.db))
        rows = db.execute("SELECT handle FROM workers").fetchall()
        db.close()
    except sqlite3.Error:
        return
    for (handle,) in rows:
        h = json.loads(handle or "{}")
        pid = h.get("pid")
        if not pid:
            continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if abs(proc.create_time() - h.get("create_time", 0)) <= 1:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


class Deployment:
    """One SKYBATCH_HOME with its own server, for the tests of a module or one test."""

    def __init__(self, root: Path) -> None:
        self.home = Home(root)
        self.root = root

    def env(self) -> dict[str, str]:
        return {**os.environ, "SKYBATCH_HOME": str(self.root)}

    def cli(
        self, *args: str, check: bool = True, cwd: Path | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "skybatch.cli", *args],
            env=self.env(),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"skybatch {' '.join(args)} failed: {proc.stderr}")
        return proc

    def pool(self, name: str, workers: int = 2, extra: str = "", tmp: Path | None = None) -> Path:
        yaml_path = (tmp or self.root) / f"{name}.yaml"
        yaml_path.write_text(f"pool:\n  workers: {workers}\nresources:\n  cpus: 1+\n{extra}")
        import skybatch

        skybatch.pool_apply(str(yaml_path), name)
        return yaml_path

    def server_pid(self) -> int | None:
        info = read_server_info(self.home)
        return info.pid if info else None

    def stop(self) -> None:
        close_clients()
        stop_server(self.home)
        _kill_leftovers(self.home)


@contextlib.contextmanager
def deployment_at(root: Path) -> Iterator[Deployment]:
    root.mkdir(parents=True, exist_ok=True)
    d = Deployment(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKYBATCH_HOME", str(root))
        try:
            yield d
        finally:
            d.stop()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A fresh deployment for one test."""
    with deployment_at(tmp_path / "home") as d:
        yield d


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A deployment with a 3-worker pool named ``pool``, shared by a module's tests."""
    with deployment_at(tmp_path_factory.mktemp("shared") / "home") as d:
        d.pool("pool", workers=3)
        yield d


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS for the session; the AWS environment variables point at it, so
    deployments started afterwards find it through the standard credential chain."""
    with (
        seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server,
        pytest.MonkeyPatch.context() as mp,
    ):
        for key, value in server.env().items():
            mp.setenv(key, value)
        yield server


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    """fake-gcs-server for the session, found through ``STORAGE_EMULATOR_HOST``."""
    with (
        fake_gcs(tmp_path_factory.mktemp("fake-gcs")) as server,
        pytest.MonkeyPatch.context() as mp,
    ):
        for key, value in server.env().items():
            mp.setenv(key, value)
        yield server


@pytest.fixture
def chdir_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path

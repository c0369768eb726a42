"""What tests share: waiting, JSONL files, a real deployment (server and
agent processes, stopped by PID afterwards), and a small tmpfs.

Importable (``from tests.helpers import ...``); the fixtures built on these live
in ``tests/e2e/conftest.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from skybatch.client.api import close_clients
from skybatch.client.launcher import stop_server
from skybatch.config import Home, read_server_info

__all__ = [
    "REPO",
    "Deployment",
    "deployment_at",
    "read_jsonl",
    "server",
    "tmpfs",
    "wait_for",
    "write_jsonl",
]

REPO = Path(__file__).resolve().parent.parent


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


def server(d: Deployment) -> tuple[str, dict[str, str], int]:
    """URL, the token header, and the server's pid."""
    info = json.loads(d.home.server_file.read_text())
    token = d.home.token_file.read_text().strip()
    return info["url"], {"Authorization": f"Bearer {token}"}, info["pid"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, mode: int = 0o1777, busy_wait: float = 0.0) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (made if missing); the test is skipped
    where mounting is not allowed. Unmounting waits up to ``busy_wait`` seconds for
    the mount to be free (a deployment's processes stopping), then detaches it lazily."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode:o}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        deadline = time.monotonic() + busy_wait
        while subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            if time.monotonic() >= deadline:
                subprocess.run(["umount", "-l", str(path)], check=False)
                break
            time.sleep(0.2)

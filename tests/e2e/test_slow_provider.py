"""A provider whose calls are slow (a network round trip, a launch that takes minutes)
never stalls the server, nor another pool; a server killed mid-launch recovers its pool."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

import skybatch
from skybatch.client.api import close_clients
from skybatch.pools.registry import TEST_PROVIDERS_ENV
from tests.helpers import Deployment, deployment_at, server, wait_for


@skybatch.remote_function
def double():
    for batch in skybatch.load():
        skybatch.save_results([{"n": r["n"] * 2} for r in batch])


def test_a_one_second_liveness_check_leaves_the_loop_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_PROVIDERS_ENV, "1")  # the client validates; the server inherits it
    with deployment_at(tmp_path / "home") as d:
        d.pool("slow", workers=2, extra="provider: {type: test, alive_delay: 1.0}\n")
        url, headers, _ = server(d)
        worst = 0.0
        with httpx.Client(base_url=url, headers=headers) as client:
            # Three seconds span three rounds of checks, each 1 s long per worker.
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                start = time.monotonic()
                assert client.get("/v1/health").status_code == 200
                assert client.get("/v1/pools/slow").json()["provider"] == "test"
                worst = max(worst, time.monotonic() - start)
                time.sleep(0.02)
        assert worst < 0.3, f"the server took {worst:.2f}s to answer while checks ran"
        # Leases and commits go on meanwhile.
        job = skybatch.Dataset.from_items([{"n": n} for n in range(6)]).map(
            double, pool_name="slow", batch_size=1
        )
        assert job.results() == [{"n": n * 2} for n in range(6)]


def _apply_in_background(d: Deployment, name: str, yaml: str) -> threading.Thread:
    """``skybatch pool apply`` in a thread: it returns once the slow pool is ready."""
    path = d.root / f"{name}.yaml"
    path.write_text(yaml)
    thread = threading.Thread(
        target=d.cli, args=("pool", "apply", str(path), "--pool", name, "-y"),
        kwargs={"check": False, "timeout": 120},
    )  # fmt: skip
    thread.start()
    return thread


def _starting(name: str) -> bool:
    views = [p for p in skybatch.pool_status() if p.name == name]
    return bool(views) and any(w.status == "STARTING" for w in views[0].worker_list)


def test_a_slow_launch_holds_up_no_other_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_PROVIDERS_ENV, "1")
    with deployment_at(tmp_path / "home") as d:
        d.pool("fast", workers=1)
        # A launch that takes 20 s, as a Ray placement waiting for room or an SSH host's venv.
        slow = _apply_in_background(
            d, "slow", "pool: {workers: 1}\nprovider: {type: test, launch_delay: 20}\n"
        )
        wait_for(lambda: _starting("slow"), timeout=15, message="the slow launch to begin")
        started = time.monotonic()

        view = skybatch.pool_apply(str(d.root / "fast.yaml"), "other")
        took = time.monotonic() - started
        assert (view.status, view.ready) == ("READY", 1)
        assert took < 8, f"applying another pool took {took:.1f}s during a slow launch"

        # A killed agent of another pool is replaced as fast as ever.
        old = skybatch.pool_status("fast")[0].worker_list[0].pid
        assert old is not None
        os.killpg(old, signal.SIGKILL)
        killed = time.monotonic()

        def replaced() -> bool:
            workers = skybatch.pool_status("fast")[0].worker_list
            return [w.status for w in workers] == ["READY"] and workers[0].pid != old

        wait_for(replaced, timeout=8, message="the killed agent's replacement")
        print(
            f"\nduring a 20 s launch: another pool applied in {took:.1f}s, "
            f"a killed agent replaced in {time.monotonic() - killed:.1f}s"
        )
        assert time.monotonic() - started < 20, "the slow launch was over: nothing proven"
        slow.join(timeout=120)
        assert skybatch.pool_status("slow")[0].status == "READY"


def test_a_server_killed_mid_launch_gets_its_pool_ready_on_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_PROVIDERS_ENV, "1")
    with deployment_at(tmp_path / "home") as d:
        d.cli("server", "start")
        applying = _apply_in_background(
            d, "p", "pool: {workers: 1}\nprovider: {type: test, launch_delay: 4}\n"
        )
        wait_for(lambda: _starting("p"), timeout=15, message="the launch to begin")
        _, _, pid = server(d)
        os.kill(pid, signal.SIGKILL)  # before the launch returns: no handle recorded
        applying.join(timeout=120)
        wait_for(lambda: not psutil.pid_exists(pid), timeout=10, message="the server to die")
        close_clients()

        d.cli("server", "start")
        wait_for(
            lambda: skybatch.pool_status("p")[0].status == "READY",
            timeout=40,
            message="the pool to be READY after the restart",
        )
        db = sqlite3.connect(f"file:{d.home.db}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT status, error FROM workers ORDER BY id").fetchall()
        finally:
            db.close()
        assert rows[0] == ("LOST", "the server stopped before this worker's launch finished")
        assert [r[0] for r in rows[1:]] == ["READY"]
        job = skybatch.Dataset.from_items([{"n": n} for n in range(3)]).map(
            double, pool_name="p", batch_size=1
        )
        assert job.results() == [{"n": n * 2} for n in range(3)]

"""Autoscaling: a pool of 0..4 grows while a job waits and shrinks back after it, no
batch lost or run twice; a scale-down never stops a worker that holds a lease; a launch
that fails is shown and tried again with backoff."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import psutil
import pytest

import skybatch
from skybatch.pools.registry import TEST_PROVIDERS_ENV
from skybatch.wire import PoolView
from tests.helpers import Deployment, read_jsonl, wait_for, write_jsonl


@skybatch.remote_function
def slow_double():
    import time

    for batch in skybatch.load():
        time.sleep(0.5)
        skybatch.save_results([{"n": item["n"] * 2} for item in batch])


@skybatch.remote_function
def gated_double():
    import os
    import time

    for batch in skybatch.load():
        for item in batch:
            if item.get("gated"):
                # Held until the test opens the gate (bounded: the test fails first).
                deadline = time.monotonic() + 120
                while not os.path.exists(os.environ["GATE"]) and time.monotonic() < deadline:
                    time.sleep(0.05)
        skybatch.save_results([{"n": item["n"] * 2} for item in batch])


def autoscaled(tmp_path: Path, high: int, idle: float, extra: str = "") -> Path:
    path = tmp_path / "pool.yaml"
    path.write_text(
        f"pool:\n  min_workers: 0\n  max_workers: {high}\n  idle_timeout: {idle:g}\n"
        f"resources:\n  cpus: 1+\n{extra}"
    )
    return path


def pool(name: str = "p") -> PoolView:
    return skybatch.pool_status(name)[0]


def attempts(d: Deployment, job: str) -> list[tuple[int, int, str]]:
    """(batch, worker, status) of every attempt of the job, from the server's store."""
    db = sqlite3.connect(f"file:{d.home.db}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT batch, worker_id, status FROM attempts WHERE job_id=? ORDER BY batch, id",
            (int(job),),
        ).fetchall()
    finally:
        db.close()
    return [(r[0], r[1], r[2]) for r in rows]


def status_lines(d: Deployment) -> list[str]:
    return d.cli("pool", "status", "p").stdout.splitlines()


def test_a_pool_of_zero_grows_with_a_job_and_shrinks_back(
    deployment: Deployment, tmp_path: Path
) -> None:
    view = skybatch.pool_apply(str(autoscaled(tmp_path, high=4, idle=2)), "p")
    assert (view.status, view.workers, view.ready, view.worker_list) == ("READY", 0, 0, [])
    lines = status_lines(deployment)
    assert lines[:2] == [
        "POOL  STATUS  READY  PROVIDER  RESOURCES  JOBS",
        "p     READY   0/0    local     cpus=1+    -",
    ]
    assert lines[2] == ("Scaling: 0-4 workers, idle_timeout 2s; now 0 workers: no batches waiting")

    rows = [{"n": i} for i in range(24)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    submitted = time.monotonic()
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        slow_double, pool_name="p", batch_size=1, output=skybatch.JsonWriter(str(out)),
        stream=False,
    )  # fmt: skip

    # It grows while batches wait: past one worker, to max_workers and no further.
    sizes: list[int] = []
    launched: list[float] = []

    def grown() -> bool:
        workers = pool().worker_list
        sizes.append(len(workers))
        if len(workers) == 4 and not launched:
            launched.append(time.monotonic() - submitted)
        return [w.status for w in workers] == ["READY"] * 4

    wait_for(grown, timeout=30, message="the pool to grow to max_workers (4), all ready")
    to_max = time.monotonic() - submitted
    assert max(sizes) == 4
    grew = pool().scaling
    assert grew is not None and grew.last_decision is not None
    assert grew.last_decision.startswith("scaling up from ")

    job.wait(timeout=120)
    finished = time.monotonic()
    assert job.status().value == "SUCCEEDED"
    assert read_jsonl(out) == [{"n": r["n"] * 2} for r in rows]
    # Every batch ran once: one attempt each, committed; none lost to a scale-down.
    seen = attempts(deployment, job.job_id)
    assert [(b, s) for b, _, s in seen] == [(b, "COMMITTED") for b in range(24)]
    assert len({w for _, w, _ in seen}) > 1, "the batches spread over the grown pool"

    # And back to 0 once its workers idled 2 s, each stopped by the server.
    pids = {w.pid for w in pool().worker_list if w.pid}
    wait_for(lambda: pool().worker_list == [], timeout=30, message="the pool to shrink to 0")
    to_min = time.monotonic() - finished
    for pid in pids:
        wait_for(lambda pid=pid: not psutil.pid_exists(pid), timeout=15, message=f"agent {pid}")
    lines = status_lines(deployment)
    assert lines[1] == "p     READY   0/0    local     cpus=1+    -"
    assert lines[2] == ("Scaling: 0-4 workers, idle_timeout 2s; now 0 workers: no batches waiting")
    assert re.fullmatch(
        r"Last step: scaling down from [1-4] to 0: no batches waiting, [1-4] idle for 2s or more "
        r"\(at \d\d:\d\d:\d\d, \d+s ago\)",
        lines[3],
    ), lines[3]
    print(
        f"\nautoscaling 0..4: submit to 4 workers started {launched[0]:.2f}s, "
        f"ready {to_max:.2f}s; job end to 0 workers {to_min:.2f}s (idle_timeout 2s)"
    )


def test_a_scale_down_never_stops_the_worker_holding_a_lease(
    deployment: Deployment, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    skybatch.pool_apply(str(autoscaled(tmp_path, 3, 1, f"envs:\n  GATE: {gate}\n")), "p")
    # The first batch is held at the gate; the other two finish at once.
    rows = [{"n": 0, "gated": True}, {"n": 1}, {"n": 2}]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        gated_double, pool_name="p", batch_size=1, output=skybatch.JsonWriter(str(out)),
        stream=False,
    )  # fmt: skip
    wait_for(lambda: len(pool().worker_list) == 3, timeout=30, message="3 workers")

    def holder() -> int | None:
        held = [w for b, w, s in attempts(deployment, job.job_id) if b == 0 and s == "LEASED"]
        return held[0] if held else None

    def only_the_holder_left() -> bool:
        live = pool().worker_list
        return len(live) == 1 and live[0].id == holder()

    # The idle workers go after 1 s idle; the one holding batch 0 stays, however long.
    wait_for(only_the_holder_left, timeout=30, message="the idle workers to stop")
    kept = holder()
    scaling = pool().scaling
    assert scaling is not None and (scaling.busy, scaling.idle, scaling.target) == (1, 0, 1)
    assert scaling.last_decision is not None
    assert scaling.last_decision.startswith("scaling down from ")
    # Watched for more than idle_timeout twice over: still there, still holding.
    watch_until = time.monotonic() + 2.5
    while time.monotonic() < watch_until:
        assert [w.id for w in pool().worker_list] == [kept] and holder() == kept
        time.sleep(0.1)

    gate.touch()
    job.wait(timeout=60)
    assert job.status().value == "SUCCEEDED"
    assert read_jsonl(out) == [{"n": 0}, {"n": 2}, {"n": 4}]
    seen = attempts(deployment, job.job_id)
    assert [(b, s) for b, _, s in seen] == [(0, "COMMITTED"), (1, "COMMITTED"), (2, "COMMITTED")]
    assert seen[0][1] == kept
    wait_for(lambda: pool().worker_list == [], timeout=30, message="the pool to shrink to 0")


def test_a_failing_launch_is_shown_and_tried_again_with_backoff(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_PROVIDERS_ENV, "1")  # the client validates; the server inherits it
    gate = tmp_path / "gate"
    path = tmp_path / "pool.yaml"
    # Worker 0 starts; worker 1, asked for by the queue, never does (a host out of GPUs).
    path.write_text(
        "pool: {min_workers: 1, max_workers: 2, idle_timeout: 30}\n"
        f"envs: {{GATE: '{gate}'}}\n"
        "provider: {type: test, fail_launch: 'no room for another worker', fail_from: 1}\n"
    )
    assert skybatch.pool_apply(str(path), "p").ready == 1
    rows = [{"n": 0, "gated": True}, {"n": 1, "gated": True}, {"n": 2}]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        gated_double, pool_name="p", batch_size=1, output=skybatch.JsonWriter(str(tmp_path / "o")),
        stream=False,
    )  # fmt: skip

    error = "could not start worker 1: no room for another worker; trying again in "
    wait_for(lambda: (pool().error or "").startswith(error), timeout=30, message="the error")
    assert any(line.startswith(f"Error: {error}") for line in status_lines(deployment))

    def lost() -> int:
        db = sqlite3.connect(f"file:{deployment.home.db}?mode=ro", uri=True)
        try:
            return db.execute("SELECT count(*) FROM workers WHERE status='LOST'").fetchone()[0]
        finally:
            db.close()

    # Tried again after 1, 2, 4 s..., not on every tick (0.5 s): 12 tries in 6 s before.
    first = lost()
    watch_until = time.monotonic() + 6
    while time.monotonic() < watch_until:
        assert (pool().error or "").startswith(error), pool().error
        time.sleep(0.2)
    assert lost() - first <= 4, f"{lost() - first} launches failed in 6 s"
    log = deployment.home.server_log.read_text()
    assert "no room for another worker" in log and "Traceback" not in log

    gate.touch()
    job.wait(timeout=60)
    assert job.status().value == "SUCCEEDED"
    # Nothing waits: the next try finds nothing to launch, and the error goes.
    wait_for(lambda: pool().error is None, timeout=40, message="the error to clear")
    assert pool().status == "READY"

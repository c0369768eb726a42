"""The SQLite store: pruning finished jobs, and state.db deleted under an open store."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from skybatch.batches import BatchPlan
from skybatch.errors import ServerError
from skybatch.server.store import SqliteStore
from skybatch.states import JobStatus, WorkerStatus

SPEC = {"max_retries": 1, "retry_backoff": 0.0, "writers": []}


def _job(store: SqliteStore, status: JobStatus, finished_at: float) -> int:
    job = store.create_job("j", "p", SPEC, now=0)
    store.add_batches(job, [BatchPlan(0, 0, 0, 10, 0, 1, 1)], done=True)
    if status is not JobStatus.RUNNING:
        store.set_job_status(job, JobStatus.RUNNING, now=0)
        store.set_job_status(job, status, now=finished_at, error="x")
    return job


def _rows(path: Path, table: str, job_id: int) -> int:
    column = "id" if table == "jobs" else "job_id"
    db = sqlite3.connect(path)
    try:
        (count,) = db.execute(
            f"SELECT count(*) FROM {table} WHERE {column}=?", (job_id,)
        ).fetchone()
        return int(count)
    finally:
        db.close()


def test_prune_forgets_finished_jobs_but_the_newest_and_the_young(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    store.put_pool("p", {}, now=0)
    worker = store.add_worker("p", 0, now=0)
    store.set_worker(worker, status=WorkerStatus.READY, now=0)
    old_ok = _job(store, JobStatus.SUCCEEDED, finished_at=100)
    old_failed = _job(store, JobStatus.FAILED, finished_at=200)
    running = _job(store, JobStatus.RUNNING, finished_at=0)
    lease = store.lease("p", worker, now=1, ttl=30)
    assert lease is not None and lease.job_id == running  # running has a live attempt
    young = _job(store, JobStatus.CANCELLED, finished_at=1000)
    newest = _job(store, JobStatus.SUCCEEDED, finished_at=50)

    # The newest finished job is kept, and so is the one finished at or after 500.
    pruned = store.prune_jobs(finished_before=500, keep=1)
    assert sorted(j.id for j in pruned) == [old_ok, old_failed]
    assert [j.id for j in store.list_jobs()] == [running, young, newest]
    for job_id in (old_ok, old_failed):
        for table in ("jobs", "batches", "attempts", "poison"):
            assert _rows(tmp_path / "state.db", table, job_id) == 0, table
    assert _rows(tmp_path / "state.db", "batches", running) == 1

    # Without bounds every finished job goes; the running one never does.
    assert sorted(j.id for j in store.prune_jobs(None, 0)) == [young, newest]
    assert [j.id for j in store.list_jobs()] == [running]
    assert store.prune_jobs(None, 0) == []
    # Ids are never handed out again (logs and staging areas are named by them).
    assert store.create_job("next", "p", SPEC, now=0) == newest + 1
    store.close()


def test_a_deleted_state_db_is_written_back_from_the_open_store(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    store.put_pool("p", {"a": 1}, now=0)
    job = store.create_job("j", "p", SPEC, now=0)
    path.unlink()
    store.put_pool("q", {}, now=1)  # a change after the deletion, before the check
    store.check_file()
    assert path.exists() and store.problem is None
    assert (path.stat().st_mode & 0o777) == 0o600
    store.put_pool("r", {}, now=2)
    store.close()
    again = SqliteStore(path)
    assert [p.name for p in again.list_pools()] == ["p", "q", "r"]
    assert again.get_job(job) is not None
    again.close()


def test_a_deleted_home_is_restored_and_tells_the_server_to_stop(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    store = SqliteStore(home / "state.db")
    store.put_pool("p", {}, now=0)
    shutil.rmtree(home)
    store.check_file()
    assert store.home_lost and store.problem is None
    assert (home.stat().st_mode & 0o777) == 0o700
    store.close()
    again = SqliteStore(home / "state.db")
    assert [p.name for p in again.list_pools()] == ["p"]
    again.close()


def test_a_home_that_cannot_be_restored_stops_the_store(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    store = SqliteStore(home / "state.db")
    store.put_pool("p", {}, now=0)
    shutil.rmtree(home)
    home.write_text("not a directory")
    store.check_file()
    assert store.home_lost and store.problem is not None
    assert store.problem.startswith(f"SKYBATCH_HOME {home} was deleted while the server ran")
    assert "\n" not in store.problem
    with pytest.raises(ServerError, match="could not be restored"):
        store.list_pools()
    store.close()


@pytest.mark.parametrize("what", ["deleted", "replaced"])
def test_changes_made_while_state_db_is_written_back_are_kept(tmp_path: Path, what: str) -> None:
    """The write-back runs in a thread and lets other calls in between its steps."""
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    job = store.create_job("j", "p", SPEC, now=0)
    blob = "x" * (1 << 20)
    for row in range(40):  # 40 MB: ten steps of the copy
        store.poison_batch(job, row, row, blob, "poison", None)
    path.unlink()
    if what == "replaced":
        path.write_bytes(b"")
    restore = threading.Thread(target=store.check_file)
    made, during = [], 0
    restore.start()
    while restore.is_alive():
        made.append(store.create_job("k", "p", SPEC, now=1))
        during += restore.is_alive()
    restore.join()
    # One call may get in before the copy starts; more get in only between its steps.
    assert during > 5, f"{during} calls got in while state.db was written back"
    made.append(store.create_job("k", "p", SPEC, now=2))
    assert store.problem is None
    # The scans' own connection reads the restored file too.
    assert [j.id for j in store.list_jobs()] == [job, *made]
    store.close()
    again = SqliteStore(path)
    assert [j.id for j in again.list_jobs()] == [job, *made]
    assert len(again.poison_rows(job)) == 40
    again.close()


def test_a_scan_does_not_wait_for_the_writer(tmp_path: Path) -> None:
    """A long read in a thread takes a connection of its own, not the writer's lock."""
    store = SqliteStore(tmp_path / "state.db")
    job = store.create_job("j", "p", SPEC, now=0)
    store.add_batches(job, [BatchPlan(i, 0, i, i + 1, i, 1, i) for i in range(100)], done=True)
    with store._lock:  # a transaction under way on another thread, as far as a scan knows
        scan = threading.Thread(target=lambda: store.failed_batches(job))
        scan.start()
        scan.join(timeout=5)
        assert not scan.is_alive()
    store.close()

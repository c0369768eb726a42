"""The state store contract, with time passed in: leases, fencing, expiry, backoff.

Each store implementation gets these tests by subclassing StoreContract and
providing the ``store`` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from skybatch.batches import BatchPlan
from skybatch.server.sqlite import SqliteStore
from skybatch.server.store import Store
from skybatch.states import JobStatus, WorkerStatus

TTL = 30.0


def spec(max_retries: int = 3) -> dict[str, object]:
    return {"max_retries": max_retries, "retry_backoff": 2.0, "writers": []}


def plans(n: int, size: int = 10) -> list[BatchPlan]:
    return [BatchPlan(i, 0, i * 100, (i + 1) * 100, i * size, size, i * size + 1) for i in range(n)]


class StoreContract:
    def setup_job(self, store: Store, n: int = 3, max_retries: int = 3) -> tuple[int, int, int]:
        store.put_pool("p", {"pool": {"workers": 2}}, now=0)
        w1 = store.add_worker("p", 0, now=0)
        w2 = store.add_worker("p", 1, now=0)
        for w in (w1, w2):
            store.set_worker(w, status=WorkerStatus.READY, now=0)
        job = store.create_job("j", "p", spec(max_retries), now=0)
        store.add_batches(job, plans(n), done=True)
        return job, w1, w2

    def test_leases_in_order_and_commits(self, store: Store) -> None:
        job, w1, w2 = self.setup_job(store)
        a = store.lease("p", w1, now=1, ttl=TTL)
        b = store.lease("p", w2, now=1, ttl=TTL)
        assert a and b and (a.batch.index, b.batch.index) == (0, 1)
        assert a.batch.row_start == 0 and b.batch.row_start == 10
        after = store.commit(b.attempt, now=2)
        assert after is not None and after.committed_batches == 1 and after.committed_rows == 10
        assert store.get_job(job).status is JobStatus.RUNNING  # type: ignore[union-attr]
        assert [p.batch for p in store.committed_parts(job)] == [1]

    def test_commit_from_an_attempt_that_lost_its_lease_is_rejected(self, store: Store) -> None:
        job, w1, w2 = self.setup_job(store, n=1)
        zombie = store.lease("p", w1, now=1, ttl=TTL)
        assert zombie is not None
        pools, exhausted = store.expire_leases(now=1 + TTL + 1, max_system_failures=10)
        assert pools == {"p"} and exhausted == []
        fresh = store.lease("p", w2, now=40, ttl=TTL)
        assert fresh is not None and fresh.batch.index == 0 and fresh.attempt != zombie.attempt
        assert store.commit(zombie.attempt, now=41) is None, "zombie commit must be fenced"
        assert store.commit(fresh.attempt, now=42) is not None
        parts = store.committed_parts(job)
        assert [(p.batch, p.attempt) for p in parts] == [(0, fresh.attempt)]

    def test_a_repeated_commit_succeeds_again(self, store: Store) -> None:
        _, w1, _ = self.setup_job(store)
        a = store.lease("p", w1, now=1, ttl=TTL)
        assert a is not None
        first = store.commit(a.attempt, now=2)
        again = store.commit(a.attempt, now=3)
        assert first is not None and again is not None
        assert again.committed_batches == first.committed_batches == 1

    def test_heartbeat_renews_and_reports_revoked(self, store: Store) -> None:
        job, w1, _ = self.setup_job(store)
        a = store.lease("p", w1, now=1, ttl=TTL)
        assert a is not None
        assert store.heartbeat(w1, [a.attempt, 999], now=25, ttl=TTL) == [999]
        assert store.expire_leases(now=40, max_system_failures=10) == (set(), [])
        store.set_job_status(job, JobStatus.CANCELLED, now=41)
        assert store.heartbeat(w1, [a.attempt], now=42, ttl=TTL) == [a.attempt]

    def test_mapper_failure_backs_off_then_fails_batch(self, store: Store) -> None:
        job, w1, _ = self.setup_job(store, n=1, max_retries=1)
        a = store.lease("p", w1, now=10, ttl=TTL)
        assert a is not None
        res = store.fail(
            a.attempt, mapper_caused=True, error="E", traceback="tb", now=10, max_system_failures=10
        )
        assert res is not None and res[1] is None
        assert store.lease("p", w1, now=11, ttl=TTL) is None, "retry waits out its backoff"
        assert store.next_ready_at("p", now=11) == 12.0
        b = store.lease("p", w1, now=12, ttl=TTL)
        assert b is not None
        res = store.fail(
            b.attempt,
            mapper_caused=True,
            error="E2",
            traceback="tb2",
            now=13,
            max_system_failures=10,
        )
        assert res is not None and res[1] == 0, "batch 0 used up its retries"
        assert store.failed_batches(job) == [0]
        errors = [a.error for a in store.batch_attempts(job, 0)]
        assert errors == ["E", "E2"]

    def test_split_and_poison_keep_the_job_countable(self, store: Store) -> None:
        job, w1, _ = self.setup_job(store, n=2, max_retries=0)
        a = store.lease("p", w1, now=1, ttl=TTL)
        assert a is not None and a.batch.index == 0
        res = store.fail(
            a.attempt, mapper_caused=True, error="E", traceback=None, now=2, max_system_failures=10
        )
        assert res is not None and res[1] == 0
        halves = [BatchPlan(0, 0, 0, 50, 0, 5, 1), BatchPlan(0, 0, 50, 100, 5, 5, 6)]
        store.split_batch(job, 0, halves)
        view = store.get_job(job)
        assert view is not None and (view.total_batches, view.failed_batches) == (3, 0)
        leased = [store.lease("p", w1, now=3, ttl=TTL) for _ in range(3)]
        assert sorted(x.batch.row_start for x in leased if x) == [0, 5, 10]
        for lease in leased:
            assert lease is not None
            if lease.batch.row_start == 0:
                store.fail(
                    lease.attempt,
                    mapper_caused=True,
                    error="E",
                    traceback="tb",
                    now=4,
                    max_system_failures=10,
                )
                after = store.poison_batch(job, lease.batch.index, 0, '{"a": 1}', "E", "tb")
            else:
                store.commit(lease.attempt, now=4)
        assert after.failed_rows == 1
        view = store.get_job(job)
        assert view is not None and view.committed_batches == view.total_batches == 3
        assert [p.row_start for p in store.committed_parts(job)] == [5, 10]
        assert store.poison_rows(job) == [(0, '{"a": 1}', "E", "tb")]

    def test_lost_worker_costs_no_retry(self, store: Store) -> None:
        job, w1, w2 = self.setup_job(store, n=1, max_retries=0)
        a = store.lease("p", w1, now=1, ttl=TTL)
        assert a is not None
        store.set_worker(w1, status=WorkerStatus.LOST, now=2)
        assert store.release_worker(w1, "died", now=2, max_system_failures=10) == []
        b = store.lease("p", w2, now=2, ttl=TTL)
        assert b is not None and b.batch.index == 0
        assert store.get_job(job).lost == 1  # type: ignore[union-attr]

    def test_no_lease_for_a_stopped_worker(self, store: Store) -> None:
        _, w1, _ = self.setup_job(store)
        store.set_worker(w1, status=WorkerStatus.STOPPED, now=1)
        assert store.lease("p", w1, now=1, ttl=TTL) is None

    def test_cancel_puts_leased_batches_back(self, store: Store) -> None:
        job, w1, _ = self.setup_job(store)
        a = store.lease("p", w1, now=1, ttl=TTL)
        assert a is not None
        assert store.set_job_status(job, JobStatus.CANCELLED, now=2, error="cancelled")
        assert store.commit(a.attempt, now=3) is None
        assert not store.set_job_status(job, JobStatus.RUNNING, now=4), "finished jobs stay put"
        assert store.lease("p", w1, now=5, ttl=TTL) is None

    def test_two_jobs_share_workers(self, store: Store) -> None:
        job, w1, w2 = self.setup_job(store, n=5)
        other = store.create_job("k", "p", spec(), now=0)
        store.add_batches(other, plans(5), done=True)
        a = store.lease("p", w1, now=1, ttl=TTL)
        b = store.lease("p", w2, now=1, ttl=TTL)
        assert a and b and {a.job_id, b.job_id} == {job, other}


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        s = SqliteStore(tmp_path / "state.db")
        yield s
        s.close()

    def test_state_survives_reopening(self, tmp_path: Path) -> None:
        s = SqliteStore(tmp_path / "state.db")
        job, w1, _ = self.setup_job(s)
        a = s.lease("p", w1, now=1, ttl=TTL)
        assert a is not None
        s.commit(a.attempt, now=2)
        s.close()
        again = SqliteStore(tmp_path / "state.db")
        view = again.get_job(job)
        assert view is not None and view.committed_batches == 1 and view.total_batches == 3
        again.close()


def test_an_older_database_gets_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "state.db")
    db.execute(
        "CREATE TABLE jobs(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, "
        "pool TEXT NOT NULL, status TEXT NOT NULL, spec TEXT NOT NULL, submitted_at REAL NOT NULL, "
        "started_at REAL, finished_at REAL, total_batches INTEGER NOT NULL DEFAULT 0, "
        "total_rows INTEGER NOT NULL DEFAULT 0, indexed INTEGER NOT NULL DEFAULT 0, "
        "committed_batches INTEGER NOT NULL DEFAULT 0, committed_rows INTEGER NOT NULL DEFAULT 0, "
        "failed_batches INTEGER NOT NULL DEFAULT 0, retries INTEGER NOT NULL DEFAULT 0, "
        "lost INTEGER NOT NULL DEFAULT 0, error TEXT, version INTEGER NOT NULL DEFAULT 0, "
        "max_retries INTEGER NOT NULL, retry_backoff REAL NOT NULL)"
    )
    db.execute(
        "INSERT INTO jobs(name, pool, status, spec, submitted_at, max_retries, retry_backoff) "
        "VALUES('old', 'p', 'SUCCEEDED', '{}', 0, 3, 2.0)"
    )
    db.commit()
    db.close()
    store = SqliteStore(tmp_path / "state.db")
    job = store.get_job(1)
    assert job is not None and job.name == "old" and job.failed_rows == 0 and job.planned == 0
    store.close()

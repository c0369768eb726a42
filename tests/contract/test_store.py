"""The state store contract, with time passed in: run against every store.

A store (SQLite in a file, in memory, later Postgres) subclasses
:class:`StoreContract` and supplies the ``store`` fixture; the tests use only
the :class:`~skybatch.server.store.Store` interface. Tests of one store's own
machinery (its file, its migrations) sit in that store's class.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from skybatch.batches import BatchPlan
from skybatch.server.scheduler import SPLIT_BASE
from skybatch.server.store import MemoryStore, OutputClaimed, SqliteStore, Store
from skybatch.states import JobStatus, PoolStatus, WorkerStatus

TTL = 30.0
SPEC = {"max_retries": 3, "retry_backoff": 2.0, "writers": []}


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

    # -- autoscaling -------------------------------------------------------------------

    def test_pool_load_counts_waiting_batches_jobs_and_leases(self, store: Store) -> None:
        job, w1, w2 = self.setup_job(store, n=5)
        load = store.pool_load("p", cap=100)
        assert (load.waiting, load.jobs) == (5, 1)
        assert [(w.id, w.leases, w.idle_since) for w in load.workers] == [(w1, 0, 0), (w2, 0, 0)]
        a = store.lease("p", w1, now=1, ttl=TTL)
        assert a is not None
        load = store.pool_load("p", cap=3)
        assert load.waiting == 3, "counted up to the cap"
        assert [(w.leases, w.idle_since) for w in load.workers] == [(1, None), (0, 0)]
        store.commit(a.attempt, now=2)
        # Idle again from the first heartbeat that finds no lease, and it stays so.
        store.heartbeat(w1, [], now=3, ttl=TTL)
        store.heartbeat(w1, [], now=4, ttl=TTL)
        assert [w.idle_since for w in store.pool_load("p", cap=100).workers] == [3, 0]
        assert store.pool_load("other", cap=100) == type(load)(0, 0, [])
        store.set_job_status(job, JobStatus.CANCELLED, now=5)
        assert (store.pool_load("p", cap=100).waiting, store.pool_load("p", cap=100).jobs) == (0, 0)

    def test_an_idle_worker_is_stopped_and_gets_no_lease(self, store: Store) -> None:
        _, w1, w2 = self.setup_job(store, n=5)
        a = store.lease("p", w1, now=1, ttl=TTL)
        assert a is not None
        assert not store.stop_idle_worker(w1, idle_before=10, reason="idle", now=10), (
            "a worker holding a lease is never stopped"
        )
        assert not store.stop_idle_worker(w2, idle_before=-1, reason="idle", now=10), (
            "idle for less than asked"
        )
        assert store.stop_idle_worker(w2, idle_before=10, reason="scaled down", now=10)
        stopped = store.get_worker(w2)
        assert stopped is not None and stopped.status is WorkerStatus.STOPPED
        assert stopped.error == "scaled down"
        assert store.lease("p", w2, now=11, ttl=TTL) is None
        assert not store.stop_idle_worker(w2, idle_before=10, reason="again", now=12)
        assert [w.id for w in store.pool_load("p", cap=100).workers] == [w1]

    def test_a_worker_that_is_not_ready_is_not_stopped_as_idle(self, store: Store) -> None:
        store.put_pool("p", {"pool": {"max_workers": 2}}, now=0)
        w = store.add_worker("p", 0, now=0)
        store.heartbeat(w, [], now=1, ttl=TTL)
        assert not store.stop_idle_worker(w, idle_before=5, reason="idle", now=5)
        store.set_worker(w, status=WorkerStatus.READY, now=6)
        assert store.pool_load("p", cap=1).workers[0].idle_since == 6
        assert store.stop_idle_worker(w, idle_before=6, reason="idle", now=7)

    # -- pools, workers, jobs ----------------------------------------------------------

    def test_pools_are_put_listed_and_deleted(self, store: Store) -> None:
        store.put_pool("b", {"pool": {"workers": 1}}, now=1)
        store.put_pool("a", {"pool": {"workers": 2}}, now=2)
        store.set_pool_status("a", PoolStatus.FAILED, "no room", now=3)
        a = store.get_pool("a")
        assert a is not None and (a.status, a.error, a.updated_at) == (
            PoolStatus.FAILED,
            "no room",
            3,
        )
        # Applying again starts over: provisioning, no error, the creation time kept.
        store.put_pool("a", {"pool": {"workers": 3}}, now=4)
        a = store.get_pool("a")
        assert a is not None and a.spec == {"pool": {"workers": 3}}
        assert (a.status, a.error, a.created_at, a.updated_at) == (
            PoolStatus.PROVISIONING,
            None,
            2,
            4,
        )
        assert [p.name for p in store.list_pools()] == ["a", "b"]
        store.delete_pool("b")
        assert store.get_pool("b") is None and [p.name for p in store.list_pools()] == ["a"]

    def test_workers_are_added_updated_and_listed(self, store: Store) -> None:
        store.put_pool("p", {}, now=0)
        w1 = store.add_worker("p", 0, now=1)
        w2 = store.add_worker("p", 1, now=1)
        other = store.add_worker("q", 0, now=1)
        assert len({w1, w2, other}) == 3
        w = store.get_worker(w1)
        assert w is not None and (w.pool, w.index, w.status, w.handle) == (
            "p",
            0,
            WorkerStatus.STARTING,
            {},
        )
        store.set_worker(w1, status=WorkerStatus.READY, handle={"pid": 7}, now=2)
        store.set_worker(w2, status=WorkerStatus.LOST, error="gone", now=3)
        w = store.get_worker(w1)
        assert w is not None and (w.status, w.handle, w.last_seen) == (
            WorkerStatus.READY,
            {"pid": 7},
            2,
        )
        assert [x.id for x in store.list_workers()] == [w1, w2, other]
        assert [x.id for x in store.list_workers("p")] == [w1, w2]
        assert [x.id for x in store.list_workers("p", live_only=True)] == [w1]
        assert store.get_worker(999) is None

    def test_worker_leases_and_batches_done(self, store: Store) -> None:
        job, w1, w2 = self.setup_job(store, n=4)
        store.put_pool("q", {"pool": {"workers": 1}}, now=0)
        other = store.add_worker("q", 0, now=0)
        store.set_worker(other, status=WorkerStatus.READY, now=0)
        assert store.worker_leases("p") == {}
        a = store.lease("p", w1, now=1, ttl=TTL)
        b = store.lease("p", w1, now=1, ttl=TTL)  # prefetched behind a
        c = store.lease("p", w2, now=1, ttl=TTL)
        assert a and b and c
        assert store.worker_leases("p") == {w1: [(job, 0), (job, 1)], w2: [(job, 2)]}
        assert store.worker_leases("q") == {}
        store.commit(a.attempt, now=2)
        store.commit(a.attempt, now=3)  # a repeated commit counts once
        store.fail(
            c.attempt,
            mapper_caused=True,
            error="boom",
            traceback=None,
            now=3,
            max_system_failures=3,
        )
        assert store.worker_leases("p") == {w1: [(job, 1)]}
        done = {w.id: w.batches_done for w in store.list_workers()}
        assert done == {w1: 1, w2: 0, other: 0}
        store.commit(b.attempt, now=4)
        assert store.get_worker(w1).batches_done == 2  # type: ignore[union-attr]
        assert store.worker_leases("p") == {}

    def test_jobs_are_created_listed_and_forgotten(self, store: Store) -> None:
        job = store.create_job("j", "p", spec(), now=5)
        other = store.create_job("k", "q", spec(), now=6)
        view = store.get_job(job)
        assert view is not None and (view.name, view.pool, view.status, view.submitted_at) == (
            "j",
            "p",
            JobStatus.PENDING,
            5,
        )
        store.set_job_spec(job, {**spec(), "extra": 1})
        assert store.get_job(job).spec["extra"] == 1  # type: ignore[union-attr]
        assert [j.id for j in store.list_jobs()] == [job, other]
        assert store.active_job_ids("p") == [job]
        assert store.set_job_status(other, JobStatus.FAILED, now=7, error="bad")
        store.set_job_error(other, "bad, 3 batches")
        done = store.get_job(other)
        assert done is not None and (done.status, done.error, done.finished_at) == (
            JobStatus.FAILED,
            "bad, 3 batches",
            7,
        )
        assert [j.id for j in store.list_jobs(active_only=True)] == [job]
        store.delete_job(job)
        assert store.get_job(job) is None and [j.id for j in store.list_jobs()] == [other]

    def test_batches_count_into_the_job(self, store: Store) -> None:
        job = store.create_job("j", "p", spec(), now=0)
        store.add_batches(job, plans(2), done=False)
        assert store.note_index_start(job, restart=True) == 1
        assert store.note_index_start(job, restart=True) == 2, "no batch since: counted on"
        store.add_batches(job, plans(3)[2:], done=True)
        assert store.note_index_start(job, restart=True) == 1, "progress resets the count"
        assert store.note_index_start(job, restart=False) == 1
        view = store.get_job(job)
        assert view is not None
        assert (view.total_batches, view.planned, view.total_rows, view.indexed) == (3, 3, 30, True)
        assert store.batch_plan(job, 1) == plans(2)[1]
        assert store.batch_plan(job, 7) is None
        assert store.note_reduce_start(job, restart=False) == 1
        assert store.note_reduce_start(job, restart=True) == 2

    # -- failures ----------------------------------------------------------------------

    def test_system_failures_are_free_up_to_the_cap(self, store: Store) -> None:
        job, w1, _ = self.setup_job(store, n=1, max_retries=0)
        for now in (1, 2):
            a = store.lease("p", w1, now=now, ttl=TTL)
            assert a is not None
            res = store.fail(
                a.attempt,
                mapper_caused=False,
                error="agent died",
                traceback=None,
                now=now,
                max_system_failures=1,
            )
            assert res is not None
        # The second system failure is past the cap of 1: it costs the only try there was.
        assert res[1] == 0 and store.failed_batches(job) == [0]
        view = store.get_job(job)
        assert view is not None and (view.lost, view.failed_batches) == (2, 1)

    def test_a_signal_death_is_free_once_per_batch(self, store: Store) -> None:
        job, w1, _ = self.setup_job(store, n=1, max_retries=0)
        a = store.lease("p", w1, now=1, ttl=TTL)
        assert a is not None
        res = store.fail(
            a.attempt,
            mapper_caused=True,
            error="killed by SIGKILL",
            traceback=None,
            now=1,
            max_system_failures=10,
            signal=True,
        )
        assert res is not None and res[1] is None, "the first kill costs nothing"
        b = store.lease("p", w1, now=1, ttl=TTL)
        assert b is not None and b.batch.index == 0, "and is retried at once"
        res = store.fail(
            b.attempt,
            mapper_caused=False,
            error="killed by SIGKILL",
            traceback=None,
            now=2,
            max_system_failures=10,
            signal=True,
        )
        assert res is not None and res[1] == 0, "the second one is the mapper's"
        kinds = [x.error_kind for x in store.batch_attempts(job, 0)]
        assert kinds == ["signal", "signal"]

    def test_expired_leases_past_the_cap_exhaust_their_batch(self, store: Store) -> None:
        job, w1, _ = self.setup_job(store, n=1, max_retries=0)
        a = store.lease("p", w1, now=1, ttl=TTL)
        assert a is not None
        assert store.expire_leases(now=1 + TTL + 1, max_system_failures=0) == ({"p"}, [(job, 0)])
        assert store.failed_batches(job) == [0]
        assert [x.error for x in store.batch_attempts(job, 0)] == ["lease expired"]

    def test_split_batches_are_numbered_clear_of_planned_ones(self, store: Store) -> None:
        job, w1, _ = self.setup_job(store, n=1, max_retries=0)
        a = store.lease("p", w1, now=1, ttl=TTL)
        assert a is not None
        store.fail(
            a.attempt, mapper_caused=True, error="E", traceback=None, now=1, max_system_failures=1
        )
        store.split_batch(
            job, 0, [BatchPlan(0, 0, 0, 50, 0, 5, 1), BatchPlan(0, 0, 50, 100, 5, 5, 6)]
        )
        first = store.lease("p", w1, now=2, ttl=TTL)
        assert first is not None and first.batch.index == SPLIT_BASE
        store.fail(
            first.attempt,
            mapper_caused=True,
            error="E",
            traceback=None,
            now=2,
            max_system_failures=1,
        )
        store.split_batch(job, SPLIT_BASE, [BatchPlan(0, 0, 0, 20, 0, 2, 1)])
        indices = sorted(
            x.batch.index for x in (store.lease("p", w1, now=3, ttl=TTL) for _ in range(2)) if x
        )
        assert indices == [SPLIT_BASE + 1, SPLIT_BASE + 2]

    # -- resume, cancel, prune ---------------------------------------------------------

    def test_reopen_retries_failed_batches_and_keeps_committed_ones(self, store: Store) -> None:
        job, w1, _ = self.setup_job(store, n=2, max_retries=0)
        a = store.lease("p", w1, now=1, ttl=TTL)
        b = store.lease("p", w1, now=1, ttl=TTL)
        assert a is not None and b is not None and a.generation == 0
        store.commit(a.attempt, now=2)
        store.fail(
            b.attempt, mapper_caused=True, error="E", traceback=None, now=2, max_system_failures=1
        )
        assert not store.reopen_job(job, "p", spec(), now=3), "a running job is not reopened"
        store.set_job_status(job, JobStatus.FAILED, now=3, error="1 batch failed")
        assert store.reopen_job(job, "p", spec(max_retries=2), now=4)
        view = store.get_job(job)
        assert view is not None and view.status is JobStatus.PENDING
        assert (view.error, view.finished_at, view.failed_batches) == (None, None, 0)
        again = store.lease("p", w1, now=5, ttl=TTL)
        assert again is not None and again.batch.index == 1 and again.generation == 1
        assert [p.batch for p in store.committed_parts(job)] == [0]

    def test_finishing_a_job_revokes_its_leases(self, store: Store) -> None:
        job, w1, w2 = self.setup_job(store, n=2)
        a = store.lease("p", w1, now=1, ttl=TTL)
        b = store.lease("p", w2, now=1, ttl=TTL)
        assert a is not None and b is not None
        assert store.set_job_status(job, JobStatus.FAILED, now=2, error="stop")
        assert store.heartbeat(w1, [a.attempt], now=3, ttl=TTL) == [a.attempt]
        assert (
            store.fail(
                b.attempt,
                mapper_caused=True,
                error="E",
                traceback=None,
                now=3,
                max_system_failures=1,
            )
            is None
        )
        assert [x.status for x in store.batch_attempts(job, 0)] == ["REVOKED"]
        assert store.failed_batches(job) == []
        # Both batches went back to PENDING: a resume leases them again.
        assert store.reopen_job(job, "p", spec(), now=4)
        leased = [store.lease("p", w, now=5, ttl=TTL) for w in (w1, w2)]
        assert sorted(x.batch.index for x in leased if x) == [0, 1]

    def test_a_finished_job_releases_its_claims(self, store: Store) -> None:
        job = store.create_job("a", "p", SPEC, now=0, outputs=["/x/out"])
        with pytest.raises(OutputClaimed):
            store.create_job("b", "p", SPEC, now=1, outputs=["/x/out"])
        store.set_job_status(job, JobStatus.SUCCEEDED, now=2)
        other = store.create_job("b", "p", SPEC, now=3, outputs=["/x/out"])
        store.delete_job(other)
        store.create_job("c", "p", SPEC, now=4, outputs=["/x/out"])

    def test_prune_keeps_the_newest_the_young_and_the_unfinished(self, store: Store) -> None:
        old = store.create_job("old", "p", SPEC, now=0)
        store.add_batches(old, plans(1), done=True)
        store.set_job_status(old, JobStatus.SUCCEEDED, now=100)
        young = store.create_job("young", "p", SPEC, now=0)
        store.set_job_status(young, JobStatus.CANCELLED, now=1000)
        running = store.create_job("running", "p", SPEC, now=0)
        newest = store.create_job("newest", "p", SPEC, now=0)
        store.set_job_status(newest, JobStatus.FAILED, now=50)
        assert [j.id for j in store.prune_jobs(finished_before=500, keep=1)] == [old]
        assert store.batch_plan(old, 0) is None
        assert [j.id for j in store.list_jobs()] == [young, running, newest]
        assert sorted(j.id for j in store.prune_jobs(None, 0)) == [young, newest]
        # Ids are never handed out again (logs and staging areas are named by them).
        assert store.create_job("next", "p", SPEC, now=0) == newest + 1

    @pytest.mark.parametrize(
        ("held", "wanted", "message"),
        [
            (
                "/x/sh/out",
                "/x/sh/out/part-00000.jsonl",
                "/x/sh/out, which holds /x/sh/out/part-00000.jsonl",
            ),
            ("/x/sh/out/part-00000.jsonl", "/x/sh", "/x/sh/out/part-00000.jsonl, inside /x/sh"),
            ("/x/a.jsonl", "/x/a.jsonl", "/x/a.jsonl"),
            ("s3://b/dir", "s3://b/dir/k.jsonl", "s3://b/dir, which holds s3://b/dir/k.jsonl"),
        ],
    )
    def test_a_claim_conflicts_with_what_holds_it_or_lies_inside(
        self, store: Store, held: str, wanted: str, message: str
    ) -> None:
        first = store.create_job("a", "p", SPEC, now=0, outputs=[held])
        # Before: only the same string conflicted; a shards directory and a file in it
        # were both accepted, and the first publish removed the second's staging area.
        with pytest.raises(OutputClaimed) as e:
            store.create_job("b", "p", SPEC, now=1, outputs=[wanted])
        assert str(e.value) == f"job {first} is already writing {message}"
        assert [j.id for j in store.list_jobs()] == [first]  # the refused job was not recorded

    @pytest.mark.parametrize(
        ("held", "wanted"),
        [
            ("/x/a_b", "/x/aXb/out.jsonl"),  # LIKE would read _ as any character
            ("/x/a%", "/x/abc/out.jsonl"),  # and % as any run of them
            ("/x/out", "/x/out2/a.jsonl"),
            ("/x/out.jsonl", "/x/out.jsonl.bak"),
            ("s3://b/dir", "s3://b/dir2/k"),
        ],
    )
    def test_siblings_and_similar_names_do_not_conflict(
        self, store: Store, held: str, wanted: str
    ) -> None:
        store.create_job("a", "p", SPEC, now=0, outputs=[held])
        store.create_job("b", "p", SPEC, now=1, outputs=[wanted])

    def test_a_job_keeps_its_own_claims_when_reopened(self, store: Store) -> None:
        job = store.create_job("a", "p", SPEC, now=0, outputs=["/x/out", "/x/errors.jsonl"])
        store.set_job_status(job, JobStatus.CANCELLED, now=1)
        other = store.create_job("b", "p", SPEC, now=2, outputs=["/x/out/part-00000.jsonl"])
        with pytest.raises(OutputClaimed) as e:
            store.reopen_job(job, "p", SPEC, now=3, outputs=["/x/out", "/x/errors.jsonl"])
        assert (e.value.job_id, e.value.path) == (other, "/x/out/part-00000.jsonl")
        assert store.get_job(job).status is JobStatus.CANCELLED
        store.set_job_status(other, JobStatus.CANCELLED, now=4)
        assert store.reopen_job(job, "p", SPEC, now=5, outputs=["/x/out", "/x/errors.jsonl"])


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


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self) -> Iterator[Store]:
        s = MemoryStore()
        yield s
        s.close()


def test_an_older_database_gets_the_new_columns(tmp_path: Path) -> None:
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

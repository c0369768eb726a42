"""The state store's interfaces, one per concern, and the records they return.

Every method is one transaction. Methods that depend on time take ``now``, so
lease expiry and backoff are tested without sleeping. :class:`Store` is their
union, what the server's services take; ``sql.py`` implements it once in SQL,
``sqlite.py`` (a file, WAL) and ``memory.py`` (SQLite in memory) supply the
connection. ``tests/contract/test_store.py`` is the suite every store passes.

Safe to call from threads. The server calls a method on its event loop when it is
one short transaction (a lease, a commit, a point read), and from a thread when it
reads a whole table or a big job's rows (the scans marked below) or does file
I/O (:meth:`Maintenance.check_file`, :meth:`Maintenance.prune_jobs`).

Output claims (``claims.py``) have no methods of their own: a job claims its
outputs in the transaction that creates or reopens it, and loses them in the
one that finishes or forgets it.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from skybatch.batches import BatchPlan, Part, Place
from skybatch.states import JobStatus, PoolStatus, WorkerStatus
from skybatch.wire import JobFields

__all__ = [
    "AttemptRecord",
    "BatchStore",
    "JobRecord",
    "JobStore",
    "Lease",
    "LeaseStore",
    "Maintenance",
    "PoisonStore",
    "PoolLoad",
    "PoolRecord",
    "PoolStore",
    "ScalingStore",
    "Store",
    "WorkerLoad",
    "WorkerRecord",
    "WorkerStore",
]


@dataclass
class PoolRecord:
    name: str
    spec: dict[str, Any]
    status: PoolStatus
    error: str | None
    created_at: float
    updated_at: float


@dataclass
class WorkerRecord:
    id: int
    pool: str
    index: int
    status: WorkerStatus
    handle: dict[str, Any]
    started_at: float
    last_seen: float | None
    error: str | None
    last_job: int | None
    #: Batches it committed.
    batches_done: int = 0


@dataclass(frozen=True)
class WorkerLoad:
    """A live worker as autoscaling sees it."""

    id: int
    index: int
    status: WorkerStatus
    #: Leases it holds (a prefetched batch too).
    leases: int
    #: Since when it holds none (set when it becomes ready, cleared by a lease, set again
    #: by its first heartbeat after), or None while it holds one or has not been ready.
    idle_since: float | None


@dataclass(frozen=True)
class PoolLoad:
    """What a pool's queue asks of it, read at once for an autoscaling decision."""

    #: Pending batches of its unfinished jobs (backoffs too), counted up to the cap asked.
    waiting: int
    #: Its jobs still pending or running.
    jobs: int
    workers: list[WorkerLoad]


class JobRecord(JobFields):
    """A job as the store holds it: its fields (``wire.JobFields``), a column each,
    and what only the server reads."""

    status: JobStatus
    spec: dict[str, Any]
    #: Batches the indexer made (splits add more to total_batches).
    planned: int = 0


@dataclass(frozen=True)
class Lease:
    attempt: int
    job_id: int
    batch: BatchPlan
    expires_at: float
    #: Bumped by each resume: agents drop what they cached of the job (its mapper).
    generation: int = 0


@dataclass(frozen=True)
class AttemptRecord:
    id: int
    job_id: int
    batch: int
    worker_id: int
    status: str
    error_kind: str | None
    error: str | None
    traceback: str | None


class PoolStore(abc.ABC):
    """Pools: their spec (as applied) and status."""

    @abc.abstractmethod
    def put_pool(self, name: str, spec: dict[str, Any], now: float) -> None: ...

    @abc.abstractmethod
    def get_pool(self, name: str) -> PoolRecord | None: ...

    @abc.abstractmethod
    def list_pools(self) -> list[PoolRecord]: ...

    @abc.abstractmethod
    def set_pool_status(
        self, name: str, status: PoolStatus, error: str | None, now: float
    ) -> None: ...

    @abc.abstractmethod
    def delete_pool(self, name: str) -> None: ...


class WorkerStore(abc.ABC):
    """A pool's workers: what the provider launched and how each one is doing."""

    @abc.abstractmethod
    def add_worker(self, pool: str, index: int, now: float) -> int: ...

    @abc.abstractmethod
    def set_worker(
        self,
        worker_id: int,
        *,
        status: WorkerStatus | None = None,
        handle: dict[str, Any] | None = None,
        error: str | None = None,
        now: float,
    ) -> None: ...

    @abc.abstractmethod
    def get_worker(self, worker_id: int) -> WorkerRecord | None: ...

    @abc.abstractmethod
    def list_workers(
        self, pool: str | None = None, live_only: bool = False
    ) -> list[WorkerRecord]: ...

    @abc.abstractmethod
    def worker_leases(self, pool: str) -> dict[int, list[tuple[int, int]]]:
        """The (job, batch) each of the pool's workers holds a lease on, by worker id,
        oldest lease first (the batch its runner works on; a prefetched one after)."""


class JobStore(abc.ABC):
    """Jobs: their spec, lifecycle and output claims."""

    @abc.abstractmethod
    def create_job(
        self, name: str, pool: str, spec: dict[str, Any], now: float, outputs: Sequence[str] = ()
    ) -> int:
        """Record a pending job and claim ``outputs`` for it, in one transaction.

        Raises :class:`OutputClaimed` (and records nothing) if an unfinished job
        owns one of them. A job's claims go when it finishes or is deleted.
        """

    @abc.abstractmethod
    def reopen_job(
        self,
        job_id: int,
        pool: str,
        spec: dict[str, Any],
        now: float,
        outputs: Sequence[str] = (),
    ) -> bool:
        """Make a failed or cancelled job run again: its failed batches get fresh retries.

        Claims ``outputs`` again, raising :class:`OutputClaimed` as create_job does.
        """

    @abc.abstractmethod
    def set_job_spec(self, job_id: int, spec: dict[str, Any]) -> None:
        """Replace a pending job's spec (the server completes it once the id exists)."""

    @abc.abstractmethod
    def set_job_status(
        self, job_id: int, status: JobStatus, now: float, error: str | None = None
    ) -> bool:
        """Move a job to ``status``; a finished job never moves. Returns whether it moved.

        Leaving the running states revokes the job's leases and puts their
        batches back to PENDING, so a resume redoes them.
        """

    @abc.abstractmethod
    def set_job_error(self, job_id: int, error: str) -> None:
        """Replace a job's error text (a failed job's, once its final counts are known)."""

    @abc.abstractmethod
    def delete_job(self, job_id: int) -> None:
        """Forget a job that never started (its submission was refused)."""

    @abc.abstractmethod
    def get_job(self, job_id: int) -> JobRecord | None: ...

    @abc.abstractmethod
    def list_jobs(self, active_only: bool = False) -> list[JobRecord]:
        """Every job (a scan), or the unfinished ones."""

    @abc.abstractmethod
    def active_job_ids(self, pool: str) -> list[int]:
        """Jobs on ``pool`` that still run or reduce (agents keep their runners)."""


class BatchStore(abc.ABC):
    """A job's batches as indexed, and what became of them."""

    @abc.abstractmethod
    def add_batches(self, job_id: int, batches: Sequence[BatchPlan], done: bool) -> None:
        """Record planned batches; ``done`` marks the end of indexing."""

    @abc.abstractmethod
    def note_index_start(self, job_id: int, restart: bool) -> int:
        """Count a start of the job's indexing: how many starts since it last added a
        batch (a fresh start, not after a ``restart`` of the server, counts from 1)."""

    @abc.abstractmethod
    def note_reduce_start(self, job_id: int, restart: bool) -> int:
        """Count a start of the job's reduce: 1 for the first, one more for each start
        after a ``restart`` of the server cut the last one short."""

    @abc.abstractmethod
    def batch_plan(self, job_id: int, batch: int) -> BatchPlan | None: ...

    @abc.abstractmethod
    def failed_batches(self, job_id: int) -> list[int]:
        """The job's failed batches, in index order (a scan of its batches)."""

    @abc.abstractmethod
    def committed_parts(self, job_id: int) -> list[Part]:
        """The job's committed parts, in row order (a scan of its batches)."""

    @abc.abstractmethod
    def batch_attempts(self, job_id: int, batch: int) -> list[AttemptRecord]: ...


class PoisonStore(abc.ABC):
    """The poison-row search (``max_failed_rows``): split failed batches, isolate rows."""

    @abc.abstractmethod
    def split_batch(self, job_id: int, batch: int, halves: Sequence[BatchPlan]) -> None:
        """Replace a failed batch by smaller ones with fresh retries (poison row search)."""

    @abc.abstractmethod
    def poison_batch(
        self, job_id: int, batch: int, row: int, data: str, error: str, traceback: str | None
    ) -> JobRecord:
        """Give up on a one-row batch: record its row as poison; the job goes on."""

    @abc.abstractmethod
    def poison_rows(self, job_id: int) -> list[tuple[int, str, str, str | None]]:
        """(row, input, error, traceback) of the job's poison rows, in row order (a scan)."""


class LeaseStore(abc.ABC):
    """Leases and attempts: the per-batch path (lease, heartbeat, commit, fail) and
    putting back what lost workers and expired leases held."""

    @abc.abstractmethod
    def lease_many(
        self, pool: str, worker_id: int, now: float, ttl: float, limit: int
    ) -> list[Lease]:
        """Lease up to ``limit`` ready batches of one running job on ``pool`` to
        ``worker_id``, in batch order; fewer when the job's remaining batches, shared
        among the pool's live workers, are fewer (the tail is not held by one worker)."""

    def lease(self, pool: str, worker_id: int, now: float, ttl: float) -> Lease | None:
        """Lease the next ready batch of a running job on ``pool`` to ``worker_id``."""
        leases = self.lease_many(pool, worker_id, now, ttl, 1)
        return leases[0] if leases else None

    @abc.abstractmethod
    def next_ready_at(self, pool: str, now: float) -> float | None:
        """When the earliest batch waiting out a backoff on ``pool`` becomes ready."""

    @abc.abstractmethod
    def heartbeat(
        self, worker_id: int, attempts: Sequence[int], now: float, ttl: float
    ) -> list[int]:
        """Renew the worker's live leases; return the attempts it no longer holds."""

    @abc.abstractmethod
    def commit_many(
        self,
        attempts: Sequence[int],
        now: float,
        sizes: Sequence[Sequence[Place] | None] | None = None,
    ) -> list[JobRecord | None]:
        """Commit each attempt's batch if it still holds the lease, in one transaction;
        per attempt, its job after the commits (or None: the attempt was refused).
        ``sizes``: per attempt, where its parts were written (see :data:`Place`).

        Committing an attempt that already committed succeeds again (idempotent).
        """

    @abc.abstractmethod
    def requeue_batches(self, job_id: int, batches: Sequence[int]) -> int:
        """Committed batches whose parts were lost run again: back to PENDING, out of
        the job's committed counts, and a REDUCING job back to RUNNING; how many moved."""

    def commit(self, attempt: int, now: float) -> JobRecord | None:
        """Commit the attempt's batch if it still holds the lease; the job after, or None."""
        return self.commit_many([attempt], now)[0]

    @abc.abstractmethod
    def fail(
        self,
        attempt: int,
        *,
        mapper_caused: bool,
        error: str,
        traceback: str | None,
        now: float,
        max_system_failures: int,
        signal: bool = False,
    ) -> tuple[JobRecord, int | None] | None:
        """Record a failed attempt: (job, the batch if it exhausted its retries), or None
        if the attempt no longer held its lease. A ``signal`` death (the runner killed)
        is free the first time for its batch and costs a retry each time after."""

    @abc.abstractmethod
    def release_worker(
        self, worker_id: int, reason: str, now: float, max_system_failures: int
    ) -> list[tuple[int, int]]:
        """Put back the leases of a worker that is gone; (job, batch) of those that ran out."""

    @abc.abstractmethod
    def expire_leases(
        self, now: float, max_system_failures: int
    ) -> tuple[set[str], list[tuple[int, int]]]:
        """Put back expired leases; (pools with new work, (job, batch) of those that ran out)."""


class ScalingStore(abc.ABC):
    """Autoscaling: a pool's queue and idle workers, and stopping an idle one safely."""

    @abc.abstractmethod
    def pool_load(self, pool: str, cap: int) -> PoolLoad:
        """The pool's waiting batches (at most ``cap`` counted), unfinished jobs and live
        workers with their leases and idle times: a few indexed reads, for the loop."""

    @abc.abstractmethod
    def stop_idle_worker(self, worker_id: int, idle_before: float, reason: str, now: float) -> bool:
        """Mark a ready worker STOPPED if it holds no lease and has idled since
        ``idle_before`` or earlier; whether it did. One transaction with the check, so a
        lease (which skips stopped workers) never reaches a worker being stopped."""


class Maintenance(abc.ABC):
    """Keeping the store itself: pruning, the state file, closing."""

    #: Set when the store can no longer keep state (its file was lost): one line.
    problem: str | None = None
    #: Set when the deployment's whole home was deleted: the server must stop.
    home_lost: bool = False

    def check_file(self) -> None:  # noqa: B027 - a no-op for stores without a file
        """Called by the monitor, in a thread: notice (and repair) state lost under the
        server; calls made meanwhile on other threads must go on."""

    @abc.abstractmethod
    def prune_jobs(self, finished_before: float | None, keep: int) -> list[JobRecord]:
        """Forget finished jobs (every row of theirs), but the ``keep`` most recent ones
        and those finished at or after ``finished_before``; the jobs forgotten."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Store(
    PoolStore,
    WorkerStore,
    JobStore,
    BatchStore,
    PoisonStore,
    LeaseStore,
    ScalingStore,
    Maintenance,
):
    """Pools, workers, jobs, batches and attempts, each change one transaction: the
    union the server's services take."""

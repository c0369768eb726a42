"""The store in SQL, once: every query and statement, over any DB-API connection.

A subclass supplies the connection (``_tx``, ``_one``, ``_all``) and the schema;
``sqlite.py`` and ``memory.py`` do, and a Postgres store would differ only there
and in the dialect hooks below (``_insert``, the ``?`` paramstyle). The rules that
are not storage (which job a worker serves, what a failure costs, how split
batches are numbered) are pure functions in :mod:`skybatch.server.scheduler`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import orjson

from skybatch.batches import BatchPlan, Part, Place
from skybatch.server import scheduler
from skybatch.server.store.base import (
    AttemptRecord,
    JobRecord,
    Lease,
    PoolLoad,
    PoolRecord,
    Store,
    WorkerLoad,
    WorkerRecord,
)
from skybatch.server.store.claims import OutputClaimed, claimed_outputs
from skybatch.states import BatchStatus, JobStatus, PoolStatus, WorkerStatus

__all__ = ["Connection", "Cursor", "SqlStore"]

#: A result row, read by column name or position (``Row``, a DB-API dict row).
Row = Any


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    @property
    def lastrowid(self) -> int | None: ...

    def fetchone(self) -> Row: ...

    def fetchall(self) -> list[Row]: ...

    def __iter__(self) -> Iterator[Row]: ...


class Connection(Protocol):
    """What the SQL needs of a connection: ``execute`` and ``executemany``."""

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor: ...


_ACTIVE = (JobStatus.PENDING.value, JobStatus.RUNNING.value)
_LIVE = tuple(s.value for s in WorkerStatus if s.live)
_LIVE_MARKS = ",".join("?" * len(_LIVE))


#: A job's columns are named as its record's fields.
_JOB_COLUMNS = tuple(JobRecord.model_fields)


def _job(row: Row) -> JobRecord:
    fields = {name: row[name] for name in _JOB_COLUMNS}
    fields["spec"] = orjson.loads(fields["spec"])
    return JobRecord.model_validate(fields)  # makes the status an enum, indexed a bool


def _worker(row: Row) -> WorkerRecord:
    return WorkerRecord(
        id=row["id"],
        pool=row["pool"],
        index=row["idx"],
        status=WorkerStatus(row["status"]),
        handle=orjson.loads(row["handle"]),
        started_at=row["started_at"],
        last_seen=row["last_seen"],
        error=row["error"],
        last_job=row["last_job"],
        batches_done=row["batches_done"],
    )


def _pool(row: Row) -> PoolRecord:
    return PoolRecord(
        name=row["name"],
        spec=orjson.loads(row["spec"]),
        status=PoolStatus(row["status"]),
        error=row["error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class SqlStore(Store):
    """Every store method in SQL; subclasses hold the connection."""

    @abc.abstractmethod
    def _tx(self) -> contextlib.AbstractContextManager[Connection]:
        """One transaction that holds its write lock from the start (no upgrade races)."""

    @abc.abstractmethod
    def _one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        """One row of a read outside any transaction of ours."""

    @abc.abstractmethod
    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """Every row of a read outside any transaction of ours."""

    def _scan(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """Every row of a read that may take long (all of a big job's batches).

        The server makes these calls in a thread: a store that can read beside its
        writer (a connection of its own, as ``sqlite.py``'s) should, so that a scan
        never holds up a lease or commit on the event loop.
        """
        return self._all(sql, args)

    @staticmethod
    def _insert(db: Connection, sql: str, args: Sequence[Any]) -> int:
        """Insert one row; its generated ``id`` (a dialect without ``lastrowid`` appends
        ``RETURNING id``)."""
        rowid = db.execute(sql, args).lastrowid
        assert rowid is not None
        return rowid

    def _claim_unfinished_outputs(self) -> None:
        """The unfinished jobs' claims, made again from their specs: a database made
        before outputs were claimed, or before claims were spelled by ``output_key``."""
        with self._tx() as db:
            db.execute("DELETE FROM outputs")
            for job_id, spec in db.execute(
                "SELECT id, spec FROM jobs WHERE status IN (?,?,?)",
                (*_ACTIVE, JobStatus.REDUCING.value),
            ).fetchall():
                db.executemany(
                    "INSERT INTO outputs(path, job_id) VALUES(?,?) ON CONFLICT DO NOTHING",
                    [(p, job_id) for p in claimed_outputs(orjson.loads(spec))],
                )

    @staticmethod
    def _claim(db: Connection, job_id: int, outputs: Sequence[str]) -> None:
        """Inside the caller's transaction: raising rolls back what it recorded.

        A claim conflicts with another job's claim of the same key, of a directory
        holding it, or of anything inside it (a shards directory and a file in it).
        substr, not LIKE: paths may hold ``%`` and ``_``.
        """
        for path in outputs:
            owner = db.execute(
                "SELECT path, job_id FROM outputs WHERE job_id != :job AND (path = :path "
                "OR substr(path, 1, length(:path) + 1) = :path || '/' "
                "OR substr(:path, 1, length(path) + 1) = path || '/') LIMIT 1",
                {"job": job_id, "path": path},
            ).fetchone()
            if owner is not None:
                raise OutputClaimed(owner[0], owner[1], path)
            db.execute(
                "INSERT INTO outputs(path, job_id) VALUES(?,?) ON CONFLICT DO NOTHING",
                (path, job_id),
            )

    # -- pools and workers -------------------------------------------------------------

    def put_pool(self, name: str, spec: dict[str, Any], now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO pools(name, spec, status, created_at, updated_at) VALUES(?,?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET spec=excluded.spec, status=excluded.status, "
                "error=NULL, updated_at=excluded.updated_at",
                (name, orjson.dumps(spec), PoolStatus.PROVISIONING.value, now, now),
            )

    def get_pool(self, name: str) -> PoolRecord | None:
        row = self._one("SELECT * FROM pools WHERE name=?", (name,))
        return _pool(row) if row else None

    def list_pools(self) -> list[PoolRecord]:
        return [_pool(r) for r in self._all("SELECT * FROM pools ORDER BY name")]

    def set_pool_status(self, name: str, status: PoolStatus, error: str | None, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE pools SET status=?, error=?, updated_at=? WHERE name=?",
                (status.value, error, now, name),
            )

    def delete_pool(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM pools WHERE name=?", (name,))

    def add_worker(self, pool: str, index: int, now: float) -> int:
        with self._tx() as db:
            return self._insert(
                db,
                "INSERT INTO workers(pool, idx, status, started_at) VALUES(?,?,?,?)",
                (pool, index, WorkerStatus.STARTING.value, now),
            )

    def set_worker(
        self,
        worker_id: int,
        *,
        status: WorkerStatus | None = None,
        handle: dict[str, Any] | None = None,
        error: str | None = None,
        now: float,
    ) -> None:
        sets: list[str] = ["last_seen=?"]
        args: list[Any] = [now]
        if status is not None:
            sets.append("status=?")
            args.append(status.value)
            if status is WorkerStatus.READY:
                sets.append("idle_since=?")  # idle from the moment it can take work
                args.append(now)
        if handle is not None:
            sets.append("handle=?")
            args.append(orjson.dumps(handle).decode())
        if error is not None:
            sets.append("error=?")
            args.append(error)
        with self._tx() as db:
            db.execute(f"UPDATE workers SET {', '.join(sets)} WHERE id=?", (*args, worker_id))

    def get_worker(self, worker_id: int) -> WorkerRecord | None:
        row = self._one("SELECT * FROM workers WHERE id=?", (worker_id,))
        return _worker(row) if row else None

    def list_workers(self, pool: str | None = None, live_only: bool = False) -> list[WorkerRecord]:
        sql, args = "SELECT * FROM workers WHERE 1=1", []
        if pool is not None:
            sql += " AND pool=?"
            args.append(pool)
        if live_only:
            live = [s.value for s in WorkerStatus if s.live]
            sql += f" AND status IN ({','.join('?' * len(live))})"
            args.extend(live)
        return [_worker(r) for r in self._all(sql + " ORDER BY pool, idx, id", args)]

    def worker_leases(self, pool: str) -> dict[int, list[tuple[int, int]]]:
        leases: dict[int, list[tuple[int, int]]] = {}
        for worker_id, job_id, batch in self._all(
            "SELECT a.worker_id, a.job_id, a.batch FROM attempts a "
            "JOIN workers w ON w.id=a.worker_id WHERE a.status='LEASED' AND w.pool=? "
            "ORDER BY a.id",
            (pool,),
        ):
            leases.setdefault(worker_id, []).append((job_id, batch))
        return leases

    # -- jobs and batches ----------------------------------------------------------------

    def create_job(
        self, name: str, pool: str, spec: dict[str, Any], now: float, outputs: Sequence[str] = ()
    ) -> int:
        with self._tx() as db:
            job_id = self._insert(
                db,
                "INSERT INTO jobs(name, pool, status, spec, submitted_at, max_retries, "
                "retry_backoff) VALUES(?,?,?,?,?,?,?)",
                (
                    name,
                    pool,
                    JobStatus.PENDING.value,
                    orjson.dumps(spec),
                    now,
                    spec["max_retries"],
                    spec["retry_backoff"],
                ),
            )
            self._claim(db, job_id, outputs)
            return job_id

    def set_job_spec(self, job_id: int, spec: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET spec=? WHERE id=?", (orjson.dumps(spec), job_id))

    def delete_job(self, job_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM batches WHERE job_id=?", (job_id,))
            db.execute("DELETE FROM attempts WHERE job_id=?", (job_id,))
            db.execute("DELETE FROM outputs WHERE job_id=?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))

    def prune_jobs(self, finished_before: float | None, keep: int) -> list[JobRecord]:
        done = [s.value for s in JobStatus if s.finished]
        finished = f"status IN ({','.join('?' * len(done))})"
        rows = self._scan(
            f"SELECT id, finished_at FROM jobs WHERE {finished} ORDER BY id DESC", done
        )
        ids = [
            r["id"]
            for r in rows[keep:]
            if finished_before is None or (r["finished_at"] or 0) < finished_before
        ]
        pruned = []
        # A transaction per job: forgetting many big jobs never holds the store long.
        for job_id in ids:
            with self._tx() as db:
                # Still finished: a resume may have reopened it since the scan.
                gone = db.execute(
                    f"DELETE FROM jobs WHERE id=? AND {finished} RETURNING *", (job_id, *done)
                ).fetchall()
                if not gone:
                    continue
                for table in ("batches", "attempts", "poison", "outputs"):
                    db.execute(f"DELETE FROM {table} WHERE job_id=?", (job_id,))
            pruned.append(_job(gone[0]))
        return pruned

    def get_job(self, job_id: int) -> JobRecord | None:
        row = self._one("SELECT * FROM jobs WHERE id=?", (job_id,))
        return _job(row) if row else None

    def list_jobs(self, active_only: bool = False) -> list[JobRecord]:
        if active_only:
            rows = self._all(
                "SELECT * FROM jobs WHERE status IN (?,?,?) ORDER BY id",
                (*_ACTIVE, JobStatus.REDUCING.value),
            )
        else:
            rows = self._scan("SELECT * FROM jobs ORDER BY id")
        return [_job(r) for r in rows]

    def active_job_ids(self, pool: str) -> list[int]:
        rows = self._all(
            "SELECT id FROM jobs WHERE pool=? AND status IN (?,?,?) ORDER BY id",
            (pool, *_ACTIVE, JobStatus.REDUCING.value),
        )
        return [r[0] for r in rows]

    def add_batches(self, job_id: int, batches: Sequence[BatchPlan], done: bool) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO batches(job_id, idx, file, start, end, row_start, row_count, line, "
                "status) VALUES(?,?,?,?,?,?,?,?,'PENDING')",
                [
                    (job_id, b.index, b.file, b.start, b.end, b.row_start, b.row_count, b.line)
                    for b in batches
                ],
            )
            # New batches are progress: indexing interrupted after them starts afresh.
            db.execute(
                "UPDATE jobs SET total_batches=total_batches+?, planned=planned+?, "
                "total_rows=total_rows+?, indexed=?, version=version+1, "
                "index_starts=CASE WHEN ? THEN 0 ELSE index_starts END WHERE id=?",
                (
                    len(batches),
                    len(batches),
                    sum(b.row_count for b in batches),
                    int(done),
                    bool(batches),
                    job_id,
                ),
            )

    def note_index_start(self, job_id: int, restart: bool) -> int:
        with self._tx() as db:
            rows = db.execute(
                "UPDATE jobs SET index_starts=CASE WHEN ? THEN index_starts+1 ELSE 1 END "
                "WHERE id=? RETURNING index_starts",
                (restart, job_id),
            ).fetchall()
            return int(rows[0][0]) if rows else 0

    def note_reduce_start(self, job_id: int, restart: bool) -> int:
        with self._tx() as db:
            rows = db.execute(
                "UPDATE jobs SET reduce_starts=CASE WHEN ? THEN reduce_starts+1 ELSE 1 END "
                "WHERE id=? RETURNING reduce_starts",
                (restart, job_id),
            ).fetchall()
            return int(rows[0][0]) if rows else 0

    def set_job_status(
        self, job_id: int, status: JobStatus, now: float, error: str | None = None
    ) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or JobStatus(row["status"]).finished:
                return False
            finished = now if status.finished else None
            db.execute(
                "UPDATE jobs SET status=?, error=COALESCE(?, error), finished_at=?, "
                "version=version+1 WHERE id=?",
                (status.value, error, finished, job_id),
            )
            if status.finished:
                db.execute("DELETE FROM outputs WHERE job_id=?", (job_id,))
                db.execute(
                    "UPDATE attempts SET status='REVOKED', finished_at=? "
                    "WHERE job_id=? AND status='LEASED'",
                    (now, job_id),
                )
                db.execute(
                    "UPDATE batches SET status='PENDING', attempt=NULL "
                    "WHERE job_id=? AND status='LEASED'",
                    (job_id,),
                )
            return True

    def set_job_error(self, job_id: int, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET error=?, version=version+1 WHERE id=?", (error, job_id))

    def reopen_job(
        self,
        job_id: int,
        pool: str,
        spec: dict[str, Any],
        now: float,
        outputs: Sequence[str] = (),
    ) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status='PENDING', pool=?, spec=?, error=NULL, finished_at=NULL, "
                "failed_batches=0, max_retries=?, retry_backoff=?, version=version+1, "
                "generation=generation+1, reduce_starts=0 "
                "WHERE id=? AND status IN ('FAILED','CANCELLED')",
                (pool, orjson.dumps(spec), spec["max_retries"], spec["retry_backoff"], job_id),
            )
            if cur.rowcount == 0:
                return False
            self._claim(db, job_id, outputs)
            db.execute(
                "UPDATE batches SET status='PENDING', attempt=NULL, failures=0, "
                "system_failures=0, signals=0, ready_at=0 "
                "WHERE job_id=? AND status IN ('FAILED','LEASED')",
                (job_id,),
            )
            return True

    def split_batch(self, job_id: int, batch: int, halves: Sequence[BatchPlan]) -> None:
        with self._tx() as db:
            splits = db.execute("SELECT splits FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
            indices = scheduler.split_indices(splits, len(halves))
            db.execute(
                "UPDATE batches SET status='SPLIT' WHERE job_id=? AND idx=? AND status='FAILED'",
                (job_id, batch),
            )
            db.executemany(
                "INSERT INTO batches(job_id, idx, file, start, end, row_start, row_count, line, "
                "status) VALUES(?,?,?,?,?,?,?,?,'PENDING')",
                [
                    (job_id, idx, h.file, h.start, h.end, h.row_start, h.row_count, h.line)
                    for idx, h in zip(indices, halves, strict=True)
                ],
            )
            db.execute(
                "UPDATE jobs SET splits=splits+?, total_batches=total_batches+?, "
                "failed_batches=failed_batches-1, version=version+1 WHERE id=?",
                (len(halves), len(halves) - 1, job_id),
            )

    def poison_batch(
        self, job_id: int, batch: int, row: int, data: str, error: str, traceback: str | None
    ) -> JobRecord:
        with self._tx() as db:
            db.execute(
                "UPDATE batches SET status='POISONED' WHERE job_id=? AND idx=?", (job_id, batch)
            )
            db.execute(
                "INSERT INTO poison(job_id, row, input, error, traceback) VALUES(?,?,?,?,?) "
                "ON CONFLICT(job_id, row) DO UPDATE SET input=excluded.input, "
                "error=excluded.error, traceback=excluded.traceback",
                (job_id, row, data, error, traceback),
            )
            db.execute(
                "UPDATE jobs SET failed_rows=failed_rows+1, failed_batches=failed_batches-1, "
                "committed_batches=committed_batches+1, version=version+1 WHERE id=?",
                (job_id,),
            )
            return _job(db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def poison_rows(self, job_id: int) -> list[tuple[int, str, str, str | None]]:
        rows = self._scan(
            "SELECT row, input, error, traceback FROM poison WHERE job_id=? ORDER BY row",
            (job_id,),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def committed_parts(self, job_id: int) -> list[Part]:
        rows = self._scan(
            "SELECT idx, committed_attempt, row_start, row_count, part_sizes FROM batches "
            "WHERE job_id=? AND status='COMMITTED' ORDER BY row_start",
            (job_id,),
        )
        return [
            Part(r[0], r[1], r[2], r[3], places=tuple(orjson.loads(r[4])) if r[4] else None)
            for r in rows
        ]

    def requeue_batches(self, job_id: int, batches: Sequence[int]) -> int:
        with self._tx() as db:
            moved = rows = 0
            for idx in batches:
                row = db.execute(
                    "UPDATE batches SET status='PENDING', attempt=NULL, committed_attempt=NULL, "
                    "part_sizes=NULL, ready_at=0 WHERE job_id=? AND idx=? AND status='COMMITTED' "
                    "RETURNING row_count",
                    (job_id, idx),
                ).fetchone()
                if row is not None:
                    moved += 1
                    rows += row[0]
            db.execute(
                "UPDATE jobs SET committed_batches=committed_batches-?, "
                "committed_rows=committed_rows-?, status=?, version=version+1 "
                "WHERE id=? AND status=?",
                (moved, rows, JobStatus.RUNNING.value, job_id, JobStatus.REDUCING.value),
            )
            return moved

    def batch_attempts(self, job_id: int, batch: int) -> list[AttemptRecord]:
        rows = self._all(
            "SELECT id, job_id, batch, worker_id, status, error_kind, error, traceback "
            "FROM attempts WHERE job_id=? AND batch=? ORDER BY id",
            (job_id, batch),
        )
        return [AttemptRecord(*r) for r in rows]

    def batch_plan(self, job_id: int, batch: int) -> BatchPlan | None:
        row = self._one(
            "SELECT idx, file, start, end, row_start, row_count, line FROM batches "
            "WHERE job_id=? AND idx=?",
            (job_id, batch),
        )
        return BatchPlan(*row) if row else None

    def failed_batches(self, job_id: int) -> list[int]:
        rows = self._scan(
            "SELECT idx FROM batches WHERE job_id=? AND status='FAILED' ORDER BY idx", (job_id,)
        )
        return [r[0] for r in rows]

    # -- leases ------------------------------------------------------------------------

    def lease_many(
        self, pool: str, worker_id: int, now: float, ttl: float, limit: int
    ) -> list[Lease]:
        with self._tx() as db:
            worker = db.execute(
                "SELECT status, last_job FROM workers WHERE id=?", (worker_id,)
            ).fetchone()
            # A long poll can outlive its worker: never hand a batch to a stopped one.
            if worker is None or not WorkerStatus(worker[0]).live:
                return []
            rows = db.execute(
                # The partial indexes by name: SQLite's planner would take the primary
                # key (job_id first too) and scan every batch of the job, each lease.
                "SELECT j.id, (SELECT COUNT(*) FROM batches l INDEXED BY batches_leased "
                "WHERE l.job_id=j.id AND l.status='LEASED') FROM jobs j "
                "WHERE j.pool=? AND j.status IN (?,?) AND EXISTS(SELECT 1 FROM batches b "
                "INDEXED BY batches_pending WHERE b.job_id=j.id AND b.status='PENDING' "
                "AND b.ready_at<=?)",
                (pool, *_ACTIVE, now),
            ).fetchall()
            if not rows:
                return []
            candidates = [scheduler.Candidate(r[0], r[1]) for r in rows]
            job_id = scheduler.choose_job(candidates, worker[1])
            assert job_id is not None
            job = db.execute(
                "SELECT generation, total_batches - committed_batches - failed_batches "
                "FROM jobs WHERE id=?",
                (job_id,),
            ).fetchone()
            if worker[1] != job_id:
                # The agent sized its ask by another job's batch times: one batch first.
                limit = 1
            elif limit > 1:
                leased = next(c.leased for c in candidates if c.job_id == job_id)
                workers = db.execute(
                    f"SELECT COUNT(*) FROM workers WHERE pool=? AND status IN ({_LIVE_MARKS})",
                    (pool, *_LIVE),
                ).fetchone()[0]
                left = job[1] - leased
                limit = scheduler.lease_share(limit, left, workers)
            found = db.execute(
                "SELECT idx, file, start, end, row_start, row_count, line FROM batches "
                "INDEXED BY batches_pending WHERE job_id=? AND status='PENDING' "
                "AND ready_at<=? ORDER BY idx LIMIT ?",
                (job_id, now, limit),
            ).fetchall()
            expires = now + ttl
            leases = []
            for b in found:
                attempt = self._insert(
                    db,
                    "INSERT INTO attempts(job_id, batch, worker_id, status, leased_at, "
                    "expires_at) VALUES(?,?,?,'LEASED',?,?)",
                    (job_id, b[0], worker_id, now, expires),
                )
                db.execute(
                    "UPDATE batches SET status='LEASED', attempt=? WHERE job_id=? AND idx=?",
                    (attempt, job_id, b[0]),
                )
                leases.append(Lease(attempt, job_id, BatchPlan(*b), expires, job[0]))
            db.execute(
                "UPDATE jobs SET status='RUNNING', started_at=COALESCE(started_at, ?), "
                "version=version+1 WHERE id=?",
                (now, job_id),
            )
            db.execute(
                "UPDATE workers SET last_job=?, last_seen=?, idle_since=NULL WHERE id=?",
                (job_id, now, worker_id),
            )
            return leases

    def next_ready_at(self, pool: str, now: float) -> float | None:
        row = self._one(
            # Only batches waiting out a backoff have ready_at > 0: a small index.
            "SELECT MIN(b.ready_at) FROM batches b INDEXED BY batches_backoff "
            "JOIN jobs j ON j.id=b.job_id WHERE j.pool=? AND j.status IN (?,?) "
            "AND b.status='PENDING' AND b.ready_at>0 AND b.ready_at>?",
            (pool, *_ACTIVE, now),
        )
        return row[0] if row else None

    def heartbeat(
        self, worker_id: int, attempts: Sequence[int], now: float, ttl: float
    ) -> list[int]:
        with self._tx() as db:
            # Idle from the first heartbeat that finds it holding no lease (a lease clears
            # it): autoscaling's clock, kept off the per-batch commit.
            db.execute(
                "UPDATE workers SET last_seen=?, idle_since=CASE WHEN EXISTS(SELECT 1 FROM "
                "attempts WHERE worker_id=? AND status='LEASED') THEN NULL "
                "ELSE COALESCE(idle_since, ?) END WHERE id=?",
                (now, worker_id, now, worker_id),
            )
            revoked = []
            for attempt in attempts:
                cur = db.execute(
                    "UPDATE attempts SET expires_at=? "
                    "WHERE id=? AND worker_id=? AND status='LEASED'",
                    (now + ttl, attempt, worker_id),
                )
                if cur.rowcount == 0:
                    revoked.append(attempt)
            return revoked

    # -- autoscaling ---------------------------------------------------------------------

    def pool_load(self, pool: str, cap: int) -> PoolLoad:
        waiting = self._one(
            "SELECT COUNT(*) FROM (SELECT 1 FROM batches b JOIN jobs j ON j.id=b.job_id "
            "WHERE j.pool=? AND j.status IN (?,?) AND b.status='PENDING' LIMIT ?)",
            (pool, *_ACTIVE, cap),
        )
        jobs = self._one(
            "SELECT COUNT(*) FROM jobs WHERE pool=? AND status IN (?,?)", (pool, *_ACTIVE)
        )
        live = [s.value for s in WorkerStatus if s.live]
        rows = self._all(
            "SELECT w.id, w.idx, w.status, w.idle_since, (SELECT COUNT(*) FROM attempts a "
            "WHERE a.worker_id=w.id AND a.status='LEASED') FROM workers w "
            f"WHERE w.pool=? AND w.status IN ({','.join('?' * len(live))}) ORDER BY w.idx, w.id",
            (pool, *live),
        )
        return PoolLoad(
            waiting=waiting[0] if waiting else 0,
            jobs=jobs[0] if jobs else 0,
            workers=[WorkerLoad(r[0], r[1], WorkerStatus(r[2]), r[4], r[3]) for r in rows],
        )

    def stop_idle_worker(self, worker_id: int, idle_before: float, reason: str, now: float) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE workers SET status=?, error=?, last_seen=? WHERE id=? AND status=? "
                "AND idle_since<=? AND NOT EXISTS(SELECT 1 FROM attempts "
                "WHERE worker_id=? AND status='LEASED')",
                (
                    WorkerStatus.STOPPED.value,
                    reason,
                    now,
                    worker_id,
                    WorkerStatus.READY.value,
                    idle_before,
                    worker_id,
                ),
            )
            return cur.rowcount == 1

    def _live_attempt(self, db: Connection, attempt: int) -> Row | None:
        """The attempt's row if it still holds its batch's lease (fencing)."""
        row: Row | None = db.execute(
            "SELECT a.job_id, a.batch, a.worker_id, b.row_count, b.failures, b.system_failures, "
            "b.signals, j.max_retries, j.retry_backoff FROM attempts a "
            "JOIN batches b ON b.job_id=a.job_id AND b.idx=a.batch "
            "JOIN jobs j ON j.id=a.job_id "
            "WHERE a.id=? AND a.status='LEASED' AND b.status='LEASED' AND b.attempt=a.id "
            "AND j.status='RUNNING'",
            (attempt,),
        ).fetchone()
        return row

    def commit_many(
        self,
        attempts: Sequence[int],
        now: float,
        sizes: Sequence[Sequence[Place] | None] | None = None,
    ) -> list[JobRecord | None]:
        with self._tx() as db:
            jobs: dict[int, int | None] = {}  # per attempt, its job; None: refused
            for n, attempt in enumerate(attempts):
                part_sizes = sizes[n] if sizes is not None else None
                jobs[attempt] = self._commit_one(db, attempt, now, part_sizes)
            records = {
                j: _job(db.execute("SELECT * FROM jobs WHERE id=?", (j,)).fetchone())
                for j in set(jobs.values())
                if j is not None
            }
            return [records.get(jobs[a] or -1) for a in attempts]

    def _commit_one(
        self, db: Connection, attempt: int, now: float, sizes: Sequence[Place] | None
    ) -> int | None:
        """Commit one attempt; its job's id, or None if it no longer holds its lease."""
        row = self._live_attempt(db, attempt)
        if row is None:
            # A retried commit (the answer to the first was lost, say to a server
            # restart) must succeed again: the agent deletes the parts of a refused one.
            done = db.execute(
                "SELECT a.job_id FROM attempts a JOIN batches b ON b.job_id=a.job_id "
                "AND b.idx=a.batch WHERE a.id=? AND a.status='COMMITTED' "
                "AND b.committed_attempt=a.id",
                (attempt,),
            ).fetchone()
            return None if done is None else int(done[0])
        db.execute(
            "UPDATE attempts SET status='COMMITTED', finished_at=? WHERE id=?", (now, attempt)
        )
        db.execute(
            "UPDATE batches SET status='COMMITTED', committed_attempt=?, part_sizes=? "
            "WHERE job_id=? AND idx=?",
            (
                attempt,
                None if sizes is None else orjson.dumps(list(sizes)).decode(),
                row["job_id"],
                row["batch"],
            ),
        )
        db.execute(
            "UPDATE jobs SET committed_batches=committed_batches+1, "
            "committed_rows=committed_rows+?, version=version+1 WHERE id=?",
            (row["row_count"], row["job_id"]),
        )
        db.execute("UPDATE workers SET batches_done=batches_done+1 WHERE id=?", (row["worker_id"],))
        return int(row["job_id"])

    def _put_back(
        self,
        db: Connection,
        attempt: int,
        row: Row,
        *,
        mapper_caused: bool,
        kind: str,
        error: str,
        traceback: str | None,
        now: float,
        max_system_failures: int,
    ) -> bool:
        """Close a failed attempt and requeue or fail its batch; True if the batch failed."""
        outcome = scheduler.judge_failure(
            mapper_caused=mapper_caused,
            failures=row["failures"],
            system_failures=row["system_failures"],
            max_retries=row["max_retries"],
            retry_backoff=row["retry_backoff"],
            max_system_failures=max_system_failures,
            now=now,
        )
        db.execute(
            "UPDATE attempts SET status='FAILED', finished_at=?, error_kind=?, error=?, "
            "traceback=? WHERE id=?",
            (now, kind, error, traceback, attempt),
        )
        failed = outcome.verdict is scheduler.Verdict.FAILED
        db.execute(
            "UPDATE batches SET status=?, attempt=NULL, failures=?, system_failures=?, "
            "ready_at=? WHERE job_id=? AND idx=?",
            (
                BatchStatus.FAILED.value if failed else BatchStatus.PENDING.value,
                outcome.failures,
                outcome.system_failures,
                outcome.ready_at,
                row["job_id"],
                row["batch"],
            ),
        )
        db.execute(
            "UPDATE jobs SET failed_batches=failed_batches+?, retries=retries+?, lost=lost+?, "
            "version=version+1 WHERE id=?",
            (
                int(failed),
                int(not failed and outcome.failures > row["failures"]),
                int(not mapper_caused),
                row["job_id"],
            ),
        )
        return failed

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
        with self._tx() as db:
            row = self._live_attempt(db, attempt)
            if row is None:
                return None
            kind = "mapper" if mapper_caused else "system"
            if signal:
                mapper_caused = scheduler.signal_is_mapper_caused(row["signals"])
                kind = "signal"
                db.execute(
                    "UPDATE batches SET signals=signals+1 WHERE job_id=? AND idx=?",
                    (row["job_id"], row["batch"]),
                )
            failed = self._put_back(
                db,
                attempt,
                row,
                mapper_caused=mapper_caused,
                kind=kind,
                error=error,
                traceback=traceback,
                now=now,
                max_system_failures=max_system_failures,
            )
            job = db.execute("SELECT * FROM jobs WHERE id=?", (row["job_id"],)).fetchone()
            return _job(job), row["batch"] if failed else None

    def _release(
        self, db: Connection, attempts: list[int], reason: str, now: float, cap: int
    ) -> list[tuple[int, int]]:
        exhausted = []
        for attempt in attempts:
            row = self._live_attempt(db, attempt)
            if row is None:
                db.execute(
                    "UPDATE attempts SET status='LOST', finished_at=? "
                    "WHERE id=? AND status='LEASED'",
                    (now, attempt),
                )
                continue
            if self._put_back(
                db,
                attempt,
                row,
                mapper_caused=False,
                kind="lost",
                error=reason,
                traceback=None,
                now=now,
                max_system_failures=cap,
            ):
                exhausted.append((row["job_id"], row["batch"]))
        return exhausted

    def release_worker(
        self, worker_id: int, reason: str, now: float, max_system_failures: int
    ) -> list[tuple[int, int]]:
        with self._tx() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM attempts WHERE worker_id=? AND status='LEASED'", (worker_id,)
                )
            ]
            return self._release(db, ids, reason, now, max_system_failures)

    def expire_leases(
        self, now: float, max_system_failures: int
    ) -> tuple[set[str], list[tuple[int, int]]]:
        with self._tx() as db:
            rows = db.execute(
                "SELECT a.id, j.pool FROM attempts a JOIN jobs j ON j.id=a.job_id "
                "WHERE a.status='LEASED' AND a.expires_at<?",
                (now,),
            ).fetchall()
            if not rows:
                return set(), []
            exhausted = self._release(
                db, [r[0] for r in rows], "lease expired", now, max_system_failures
            )
            return {r[1] for r in rows}, exhausted

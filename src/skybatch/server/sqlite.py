"""The SQLite state store: WAL, one connection, one ``BEGIN IMMEDIATE`` per change."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from skybatch.batches import BatchPlan, Part
from skybatch.errors import DiskFullError, ServerError, SkyBatchError
from skybatch.server import scheduler
from skybatch.server.store import (
    AttemptRecord,
    JobRecord,
    Lease,
    OutputClaimed,
    PoolRecord,
    Store,
    WorkerRecord,
    claimed_outputs,
)
from skybatch.states import BatchStatus, JobStatus, PoolStatus, WorkerStatus

__all__ = ["SqliteStore"]

log = logging.getLogger("skybatch.server")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pools(
  name TEXT PRIMARY KEY, spec TEXT NOT NULL, status TEXT NOT NULL, error TEXT,
  created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS workers(
  id INTEGER PRIMARY KEY AUTOINCREMENT, pool TEXT NOT NULL, idx INTEGER NOT NULL,
  status TEXT NOT NULL, handle TEXT NOT NULL DEFAULT '{}', started_at REAL NOT NULL,
  last_seen REAL, error TEXT, last_job INTEGER);
CREATE INDEX IF NOT EXISTS workers_pool ON workers(pool, status);
CREATE TABLE IF NOT EXISTS jobs(
  id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, pool TEXT NOT NULL,
  status TEXT NOT NULL, spec TEXT NOT NULL, submitted_at REAL NOT NULL,
  started_at REAL, finished_at REAL,
  total_batches INTEGER NOT NULL DEFAULT 0, total_rows INTEGER NOT NULL DEFAULT 0,
  indexed INTEGER NOT NULL DEFAULT 0,
  committed_batches INTEGER NOT NULL DEFAULT 0, committed_rows INTEGER NOT NULL DEFAULT 0,
  failed_batches INTEGER NOT NULL DEFAULT 0, retries INTEGER NOT NULL DEFAULT 0,
  lost INTEGER NOT NULL DEFAULT 0, error TEXT, version INTEGER NOT NULL DEFAULT 0,
  max_retries INTEGER NOT NULL, retry_backoff REAL NOT NULL,
  planned INTEGER NOT NULL DEFAULT 0, splits INTEGER NOT NULL DEFAULT 0,
  failed_rows INTEGER NOT NULL DEFAULT 0, generation INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs(pool, id) WHERE status IN ('PENDING','RUNNING');
CREATE TABLE IF NOT EXISTS batches(
  job_id INTEGER NOT NULL, idx INTEGER NOT NULL, file INTEGER NOT NULL,
  start INTEGER NOT NULL, end INTEGER NOT NULL, row_start INTEGER NOT NULL,
  row_count INTEGER NOT NULL, line INTEGER NOT NULL, status TEXT NOT NULL,
  failures INTEGER NOT NULL DEFAULT 0, system_failures INTEGER NOT NULL DEFAULT 0,
  ready_at REAL NOT NULL DEFAULT 0, attempt INTEGER, committed_attempt INTEGER,
  PRIMARY KEY(job_id, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batches_pending ON batches(job_id, idx) WHERE status='PENDING';
CREATE INDEX IF NOT EXISTS batches_leased ON batches(job_id) WHERE status='LEASED';
CREATE TABLE IF NOT EXISTS attempts(
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL, batch INTEGER NOT NULL,
  worker_id INTEGER NOT NULL, status TEXT NOT NULL, leased_at REAL NOT NULL,
  expires_at REAL NOT NULL, finished_at REAL, error_kind TEXT, error TEXT, traceback TEXT);
CREATE INDEX IF NOT EXISTS attempts_live ON attempts(expires_at) WHERE status='LEASED';
CREATE INDEX IF NOT EXISTS attempts_worker ON attempts(worker_id) WHERE status='LEASED';
CREATE INDEX IF NOT EXISTS attempts_batch ON attempts(job_id, batch);
CREATE TABLE IF NOT EXISTS poison(
  job_id INTEGER NOT NULL, row INTEGER NOT NULL, input TEXT NOT NULL, error TEXT NOT NULL,
  traceback TEXT, PRIMARY KEY(job_id, row)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outputs(
  path TEXT PRIMARY KEY, job_id INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outputs_job ON outputs(job_id);
"""

#: Columns added after the first schema: (table, column, declaration), applied in order.
_ADDED_COLUMNS = [
    ("jobs", "planned", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "splits", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "failed_rows", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "generation", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "index_starts", "INTEGER NOT NULL DEFAULT 0"),
    ("batches", "signals", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "reduce_starts", "INTEGER NOT NULL DEFAULT 0"),
]

#: Batches made by splitting a failed batch get indices from here up, clear of planned ones.
SPLIT_BASE = 1_000_000_000

_ACTIVE = (JobStatus.PENDING.value, JobStatus.RUNNING.value)


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        name=row["name"],
        pool=row["pool"],
        status=JobStatus(row["status"]),
        spec=orjson.loads(row["spec"]),
        submitted_at=row["submitted_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        total_batches=row["total_batches"],
        total_rows=row["total_rows"],
        indexed=bool(row["indexed"]),
        committed_batches=row["committed_batches"],
        committed_rows=row["committed_rows"],
        failed_batches=row["failed_batches"],
        retries=row["retries"],
        lost=row["lost"],
        error=row["error"],
        version=row["version"],
        planned=row["planned"],
        failed_rows=row["failed_rows"],
    )


def _worker(row: sqlite3.Row) -> WorkerRecord:
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
    )


def _pool(row: sqlite3.Row) -> PoolRecord:
    return PoolRecord(
        name=row["name"],
        spec=orjson.loads(row["spec"]),
        status=PoolStatus(row["status"]),
        error=row["error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class SqliteStore(Store):
    """State in one SQLite file. Safe to share between the event loop and worker threads."""

    def __init__(self, path: Path | str) -> None:
        self._path = Path(path)
        self._lock = threading.RLock()
        self.problem: str | None = None
        self.home_lost = False
        self._home_id = self._dir_id()
        self._db = self._connect()
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._claim_unfinished_outputs()

    def _connect(self) -> sqlite3.Connection:
        # Created 0600 here (SQLite gives its -wal and -shm files the same mode); the
        # umask would leave state.db readable by everyone.
        os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
        db = sqlite3.connect(str(self._path), check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across a crash of this process (WAL); only power loss can
        # drop the last transactions, which re-running those batches repairs.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        st = os.stat(self._path)
        self._file_id = (st.st_dev, st.st_ino)
        return db

    def check_file(self) -> None:
        """Put state.db back if it was deleted or replaced under us (one stat when not).

        The open connection still holds the whole state, so it is written back to the
        path; going on silently would lose every job and pool at the next restart.
        If that fails, the store refuses all further work with :attr:`problem`.
        """
        if self.problem is not None or self.home_lost:
            return
        try:
            st = os.stat(self._path)
            if (st.st_dev, st.st_ino) == self._file_id:
                return
            what = "replaced"
        except (FileNotFoundError, NotADirectoryError):
            what = "deleted"
        if self._dir_id() != self._home_id:
            self._restore_home()
            return
        with self._lock:
            try:
                aside = self._restore(what)
            except (OSError, sqlite3.Error) as e:
                self.problem = (
                    f"{self._path} was {what} while the server ran and could not be restored "
                    f"({e}); this server stopped serving: restart it to go on from what is "
                    "on disk"
                )
                log.error("%s", self.problem)
                return
        log.warning(
            "%s was %s while the server ran; restored it from the open database%s",
            self._path,
            what,
            f" (the file found there is now {aside})" if aside else "",
        )

    def _dir_id(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._path.parent)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (st.st_dev, st.st_ino)

    def _restore_home(self) -> None:
        """The whole home went (``rm -rf``): make it again and write state.db back.

        The server cannot go on there (its workers' directories and its lock went
        too), so :attr:`home_lost` tells it to stop (and log why); the next server
        starts from this state. If even this fails, :attr:`problem` says so.
        """
        from skybatch.config import Home

        home = self._path.parent
        self.home_lost = True
        with self._lock:
            try:
                Home(home).ensure()
                self._restore("replaced" if self._path.exists() else "deleted")
                self._home_id = self._dir_id()
            except (OSError, sqlite3.Error, SkyBatchError) as e:
                self.problem = (
                    f"SKYBATCH_HOME {home} was deleted while the server ran and could not be "
                    f"restored ({e}); the jobs and pools it held are lost"
                )
                return

    def _restore(self, what: str) -> Path | None:
        tmp = self._path.with_name(self._path.name + ".restoring")
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        copy = sqlite3.connect(str(tmp))
        try:
            self._db.backup(copy)
        finally:
            copy.close()
        aside = None
        if what == "replaced":
            aside = self._path.with_name(f"{self._path.name}.replaced-{int(time.time())}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._path, aside)
        self._db.close()
        # The old file's WAL must not be replayed into the copy.
        for suffix in ("-wal", "-shm"):
            self._path.with_name(self._path.name + suffix).unlink(missing_ok=True)
        os.replace(tmp, self._path)
        self._db = self._connect()
        return aside

    def _migrate(self) -> None:
        """Add the columns newer versions introduced to a database made by an older one."""
        for table, column, decl in _ADDED_COLUMNS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

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
                    "INSERT OR IGNORE INTO outputs(path, job_id) VALUES(?,?)",
                    [(p, job_id) for p in claimed_outputs(orjson.loads(spec))],
                )

    @staticmethod
    def _claim(db: sqlite3.Connection, job_id: int, outputs: Sequence[str]) -> None:
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
            db.execute("INSERT OR IGNORE INTO outputs(path, job_id) VALUES(?,?)", (path, job_id))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _refuse_if_lost(self) -> None:
        if self.problem is not None:
            raise ServerError(self.problem)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._refuse_if_lost()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    # A full disk may have rolled it back already: ROLLBACK would then
                    # fail and hide the error, and a transaction left open would stop
                    # every later one (the state could not recover with the space).
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as e:
                if "database or disk is full" not in str(e):  # SQLITE_FULL's message
                    raise
                raise DiskFullError(
                    f"cannot write the state database {self._path}: no space left on its "
                    "file system (database or disk is full); free space there and skybatch "
                    "carries on"
                ) from None

    def _one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            self._refuse_if_lost()
            row: sqlite3.Row | None = self._db.execute(sql, args).fetchone()
            return row

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            self._refuse_if_lost()
            return self._db.execute(sql, args).fetchall()

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
            cur = db.execute(
                "INSERT INTO workers(pool, idx, status, started_at) VALUES(?,?,?,?)",
                (pool, index, WorkerStatus.STARTING.value, now),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

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

    # -- jobs and batches ----------------------------------------------------------------

    def create_job(
        self, name: str, pool: str, spec: dict[str, Any], now: float, outputs: Sequence[str] = ()
    ) -> int:
        with self._tx() as db:
            cur = db.execute(
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
            assert cur.lastrowid is not None
            self._claim(db, cur.lastrowid, outputs)
            return cur.lastrowid

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
        with self._tx() as db:
            rows = db.execute(
                f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(done))}) "
                "ORDER BY id DESC",
                done,
            ).fetchall()[keep:]
            if finished_before is not None:
                rows = [r for r in rows if (r["finished_at"] or 0) < finished_before]
            ids = [(r["id"],) for r in rows]
            for table in ("batches", "attempts", "poison", "outputs"):
                db.executemany(f"DELETE FROM {table} WHERE job_id=?", ids)
            db.executemany("DELETE FROM jobs WHERE id=?", ids)
            return [_job(r) for r in rows]

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
            rows = self._all("SELECT * FROM jobs ORDER BY id")
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
            db.execute(
                "UPDATE batches SET status='SPLIT' WHERE job_id=? AND idx=? AND status='FAILED'",
                (job_id, batch),
            )
            db.executemany(
                "INSERT INTO batches(job_id, idx, file, start, end, row_start, row_count, line, "
                "status) VALUES(?,?,?,?,?,?,?,?,'PENDING')",
                [
                    (
                        job_id,
                        SPLIT_BASE + splits + k,
                        h.file,
                        h.start,
                        h.end,
                        h.row_start,
                        h.row_count,
                        h.line,
                    )
                    for k, h in enumerate(halves)
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
                "INSERT OR REPLACE INTO poison(job_id, row, input, error, traceback) "
                "VALUES(?,?,?,?,?)",
                (job_id, row, data, error, traceback),
            )
            db.execute(
                "UPDATE jobs SET failed_rows=failed_rows+1, failed_batches=failed_batches-1, "
                "committed_batches=committed_batches+1, version=version+1 WHERE id=?",
                (job_id,),
            )
            return _job(db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def poison_rows(self, job_id: int) -> list[tuple[int, str, str, str | None]]:
        rows = self._all(
            "SELECT row, input, error, traceback FROM poison WHERE job_id=? ORDER BY row",
            (job_id,),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def committed_parts(self, job_id: int) -> list[Part]:
        rows = self._all(
            "SELECT idx, committed_attempt, row_start, row_count FROM batches "
            "WHERE job_id=? AND status='COMMITTED' ORDER BY row_start",
            (job_id,),
        )
        return [Part(r[0], r[1], r[2], r[3]) for r in rows]

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
        rows = self._all(
            "SELECT idx FROM batches WHERE job_id=? AND status='FAILED' ORDER BY idx", (job_id,)
        )
        return [r[0] for r in rows]

    # -- leases ------------------------------------------------------------------------

    def lease(self, pool: str, worker_id: int, now: float, ttl: float) -> Lease | None:
        with self._tx() as db:
            worker = db.execute("SELECT status FROM workers WHERE id=?", (worker_id,)).fetchone()
            # A long poll can outlive its worker: never hand a batch to a stopped one.
            if worker is None or not WorkerStatus(worker[0]).live:
                return None
            rows = db.execute(
                "SELECT j.id, (SELECT COUNT(*) FROM batches l WHERE l.job_id=j.id "
                "AND l.status='LEASED') FROM jobs j WHERE j.pool=? AND j.status IN (?,?) "
                "AND EXISTS(SELECT 1 FROM batches b WHERE b.job_id=j.id AND b.status='PENDING' "
                "AND b.ready_at<=?)",
                (pool, *_ACTIVE, now),
            ).fetchall()
            if not rows:
                return None
            last = db.execute("SELECT last_job FROM workers WHERE id=?", (worker_id,)).fetchone()
            job_id = scheduler.choose_job(
                [scheduler.Candidate(r[0], r[1]) for r in rows], last[0] if last else None
            )
            b = db.execute(
                "SELECT idx, file, start, end, row_start, row_count, line FROM batches "
                "WHERE job_id=? AND status='PENDING' AND ready_at<=? ORDER BY idx LIMIT 1",
                (job_id, now),
            ).fetchone()
            expires = now + ttl
            cur = db.execute(
                "INSERT INTO attempts(job_id, batch, worker_id, status, leased_at, expires_at) "
                "VALUES(?,?,?,'LEASED',?,?)",
                (job_id, b[0], worker_id, now, expires),
            )
            attempt = cur.lastrowid
            assert attempt is not None
            db.execute(
                "UPDATE batches SET status='LEASED', attempt=? WHERE job_id=? AND idx=?",
                (attempt, job_id, b[0]),
            )
            db.execute(
                "UPDATE jobs SET status='RUNNING', started_at=COALESCE(started_at, ?), "
                "version=version+1 WHERE id=?",
                (now, job_id),
            )
            db.execute(
                "UPDATE workers SET last_job=?, last_seen=? WHERE id=?", (job_id, now, worker_id)
            )
            assert job_id is not None
            generation = db.execute("SELECT generation FROM jobs WHERE id=?", (job_id,)).fetchone()[
                0
            ]
            return Lease(attempt, job_id, BatchPlan(*b), expires, generation)

    def next_ready_at(self, pool: str, now: float) -> float | None:
        row = self._one(
            "SELECT MIN(b.ready_at) FROM batches b JOIN jobs j ON j.id=b.job_id "
            "WHERE j.pool=? AND j.status IN (?,?) AND b.status='PENDING' AND b.ready_at>?",
            (pool, *_ACTIVE, now),
        )
        return row[0] if row else None

    def heartbeat(
        self, worker_id: int, attempts: Sequence[int], now: float, ttl: float
    ) -> list[int]:
        with self._tx() as db:
            db.execute("UPDATE workers SET last_seen=? WHERE id=?", (now, worker_id))
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

    def _live_attempt(self, db: sqlite3.Connection, attempt: int) -> sqlite3.Row | None:
        """The attempt's row if it still holds its batch's lease (fencing)."""
        row: sqlite3.Row | None = db.execute(
            "SELECT a.job_id, a.batch, b.row_count, b.failures, b.system_failures, b.signals, "
            "j.max_retries, j.retry_backoff FROM attempts a "
            "JOIN batches b ON b.job_id=a.job_id AND b.idx=a.batch "
            "JOIN jobs j ON j.id=a.job_id "
            "WHERE a.id=? AND a.status='LEASED' AND b.status='LEASED' AND b.attempt=a.id "
            "AND j.status='RUNNING'",
            (attempt,),
        ).fetchone()
        return row

    def commit(self, attempt: int, now: float) -> JobRecord | None:
        with self._tx() as db:
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
                if done is None:
                    return None
                return _job(db.execute("SELECT * FROM jobs WHERE id=?", (done[0],)).fetchone())
            db.execute(
                "UPDATE attempts SET status='COMMITTED', finished_at=? WHERE id=?", (now, attempt)
            )
            db.execute(
                "UPDATE batches SET status='COMMITTED', committed_attempt=? "
                "WHERE job_id=? AND idx=?",
                (attempt, row["job_id"], row["batch"]),
            )
            db.execute(
                "UPDATE jobs SET committed_batches=committed_batches+1, "
                "committed_rows=committed_rows+?, version=version+1 WHERE id=?",
                (row["row_count"], row["job_id"]),
            )
            job = db.execute("SELECT * FROM jobs WHERE id=?", (row["job_id"],)).fetchone()
            return _job(job)

    def _put_back(
        self,
        db: sqlite3.Connection,
        attempt: int,
        row: sqlite3.Row,
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
                # One kill from outside (an operator, the OOM killer for another process's
                # sake) is not the mapper's fault; a batch whose runner dies again is.
                mapper_caused, kind = row["signals"] > 0, "signal"
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
        self, db: sqlite3.Connection, attempts: list[int], reason: str, now: float, cap: int
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

"""SQLite under the SQL store: the schema, one connection, one ``BEGIN IMMEDIATE`` per
change; :class:`SqliteStore` keeps it in a file (WAL) and watches that file.

The server calls the store from its event loop, and from threads for work that can
take long (scans of a big job's rows, writing state.db back). In the file store such
a scan reads on a connection of its own (WAL lets it read beside the writer), and the
write-back copies in steps, so that neither holds the lock a lease or commit on the
loop waits for more than a few milliseconds.
"""

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

from skybatch.errors import DiskFullError, ServerError, SkyBatchError
from skybatch.server.store.sql import SqlStore

__all__ = ["SqliteDatabase", "SqliteStore"]

log = logging.getLogger("skybatch.server")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pools(
  name TEXT PRIMARY KEY, spec TEXT NOT NULL, status TEXT NOT NULL, error TEXT,
  created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS workers(
  id INTEGER PRIMARY KEY AUTOINCREMENT, pool TEXT NOT NULL, idx INTEGER NOT NULL,
  status TEXT NOT NULL, handle TEXT NOT NULL DEFAULT '{}', started_at REAL NOT NULL,
  last_seen REAL, error TEXT, last_job INTEGER, idle_since REAL,
  batches_done INTEGER NOT NULL DEFAULT 0);
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
CREATE INDEX IF NOT EXISTS batches_backoff ON batches(job_id, ready_at)
  WHERE status='PENDING' AND ready_at>0;
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

#: Pages the write-back copies per step, holding the lock (4 MB at the default page size).
_BACKUP_STEP = 1024

#: Columns added after the first schema: (table, column, declaration), applied in order.
_ADDED_COLUMNS = [
    ("jobs", "planned", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "splits", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "failed_rows", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "generation", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "index_starts", "INTEGER NOT NULL DEFAULT 0"),
    ("batches", "signals", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "reduce_starts", "INTEGER NOT NULL DEFAULT 0"),
    ("workers", "idle_since", "REAL"),
    ("workers", "batches_done", "INTEGER NOT NULL DEFAULT 0"),
    ("batches", "part_sizes", "TEXT"),
]


def connect(target: str) -> sqlite3.Connection:
    """A connection the event loop and worker threads share (under the store's lock),
    in autocommit mode so that ``_tx`` alone opens transactions."""
    db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    return db


class SqliteDatabase(SqlStore):
    """The SQL store on one SQLite connection: schema, migrations, transactions.

    ``where`` names the database in errors. Safe to share between the event loop
    and worker threads.
    """

    def __init__(self, db: sqlite3.Connection, where: str) -> None:
        self._lock = threading.RLock()
        self.problem: str | None = None
        self.home_lost = False
        self._where = where
        self._db = db
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._claim_unfinished_outputs()

    def _migrate(self) -> None:
        """Add the columns newer versions introduced to a database made by an older one."""
        for table, column, decl in _ADDED_COLUMNS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

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
                    f"cannot write the state database {self._where}: no space left on its "
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


class SqliteStore(SqliteDatabase):
    """State in one SQLite file (WAL), written back if it is deleted under the server.

    Scans (:meth:`_scan`) read on a second connection under a lock of their own.
    """

    def __init__(self, path: Path | str) -> None:
        self._path = Path(path)
        self._home_id = self._dir_id()
        super().__init__(self._connect(), str(self._path))
        self._read_lock = threading.Lock()
        self._reader = self._connect_reader()

    def _connect_reader(self) -> sqlite3.Connection:
        db = connect(str(self._path))
        db.execute("PRAGMA query_only=ON")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    def _scan(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._read_lock:
            self._refuse_if_lost()
            return self._reader.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._reader.close()
            self._db.close()

    def _connect(self) -> sqlite3.Connection:
        # Created 0600 here (SQLite gives its -wal and -shm files the same mode); the
        # umask would leave state.db readable by everyone.
        os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
        db = connect(str(self._path))
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
        try:
            Home(home).ensure()
            self._restore("replaced" if self._path.exists() else "deleted")
            self._home_id = self._dir_id()
        except (OSError, sqlite3.Error, SkyBatchError) as e:
            self.problem = (
                f"SKYBATCH_HOME {home} was deleted while the server ran and could not be "
                f"restored ({e}); the jobs and pools it held are lost"
            )

    def _restore(self, what: str) -> Path | None:
        """Write the open database back to the path and reopen it there; run in a thread.

        The copy goes in steps with the lock released between them, so calls on the
        event loop go on meanwhile: SQLite carries a change made through this same
        connection during the copy into the copy. Only the last step and the swap of
        files hold the lock to the end, so no change falls between copy and reopen.
        """
        tmp = self._path.with_name(self._path.name + ".restoring")
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        copy = sqlite3.connect(str(tmp))
        with self._lock:
            try:
                self._db.backup(copy, pages=_BACKUP_STEP, progress=self._between_steps)
            finally:
                copy.close()
            aside = None
            if what == "replaced":
                aside = self._path.with_name(f"{self._path.name}.replaced-{int(time.time())}")
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self._path, aside)
            with self._read_lock:
                # Closed before the writer, whose close (the last on the old file) then
                # checkpoints and removes the old WAL, never the new file's.
                self._reader.close()
                self._db.close()
                # The old file's WAL must not be replayed into the copy.
                for suffix in ("-wal", "-shm"):
                    self._path.with_name(self._path.name + suffix).unlink(missing_ok=True)
                os.replace(tmp, self._path)
                self._db = self._connect()
                self._reader = self._connect_reader()
        return aside

    def _between_steps(self, status: int, remaining: int, total: int) -> None:
        """Let the loop's calls in between two steps of the copy (not after the last)."""
        if status == sqlite3.SQLITE_DONE:
            return
        self._lock.release()
        try:
            time.sleep(0.001)  # a waiter takes the lock now, not after our next step
        finally:
            self._lock.acquire()

"""What the job service's parts share: the server's context and the in-memory state
of its jobs.

One ``Runtime`` per server, handed to each part explicitly: every piece of state
that more than one part reads or writes is declared here, and only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from skybatch.errors import NotFoundError
from skybatch.io.base import InputReader, OutputWriter
from skybatch.io.registry import writer_from_spec
from skybatch.server.context import Context
from skybatch.server.store import JobRecord
from skybatch.states import JobStatus

__all__ = ["Runtime", "cleanup", "ready_to_reduce", "remove_made_dirs", "replaceable"]

log = logging.getLogger("skybatch.server")


@dataclass(eq=False)
class Runtime:
    ctx: Context
    #: Held so that no running task is garbage-collected before it ends.
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    #: Each job's loaded writers: a custom writer's class is loaded once per job.
    loaded_writers: dict[int, list[OutputWriter]] = field(default_factory=dict)
    #: Jobs whose output is being written (their reduce, or a reduce_results): one at a time.
    reducing: set[int] = field(default_factory=set)
    #: Jobs whose final status is recorded but whose staging area is still being
    #: removed: waiters see the end only after it, so nothing is left when ds.map returns.
    finishing: set[int] = field(default_factory=set)
    #: Set to stop a job's indexing thread between two blocks (cancel, shutdown).
    indexing: dict[int, threading.Event] = field(default_factory=dict)
    #: What holds running jobs back without failing them (a full disk), by job and
    #: source; in memory, since the state database may be what cannot be written.
    health: dict[int, dict[str, str]] = field(default_factory=dict)
    #: Why state.db could not be written, while it cannot.
    state_full: str | None = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def notify(self, job: JobRecord | int, pool: str | None = None) -> None:
        """Wake the job's followers and, with its pool, the pool's lease requests."""
        job_id = job if isinstance(job, int) else job.id
        self.ctx.notifier.notify(("job", job_id))
        if pool is None and isinstance(job, JobRecord):
            pool = job.pool
        if pool is not None:
            self.ctx.notifier.notify(("pool", pool))

    def get(self, job_id: int) -> JobRecord:
        job = self.ctx.store.get_job(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id}; see `skybatch jobs queue` for the job ids")
        return job

    def writers(self, job: JobRecord) -> list[OutputWriter]:
        cached = self.loaded_writers.get(job.id)
        if cached is None:
            cached = [writer_from_spec(w) for w in job.spec["writers"]]
            self.loaded_writers[job.id] = cached
        return cached


def ready_to_reduce(job: JobRecord) -> bool:
    """Every batch is indexed and done (committed, or poisoned) while the job runs."""
    return (
        job.status in (JobStatus.PENDING, JobStatus.RUNNING)
        and job.indexed
        and job.committed_batches == job.total_batches
    )


def replaceable(spec: dict[str, Any]) -> list[str]:
    """The outputs this job's reduce_results published: its resume may replace them."""
    return list(spec.get("_partial_outputs", ()))


def remove_made_dirs(spec: dict[str, Any]) -> None:
    for path in spec.get("_new_outputs", ()):
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only if empty: whatever else is there stays


def cleanup(writers: list[OutputWriter], job_id: int, reader: InputReader | None = None) -> None:
    """Remove a job's staging areas and scratch input, best effort."""
    if reader is not None:
        try:
            reader.cleanup()
        except Exception as e:
            log.warning("cleanup of %s for job %d failed: %s", reader.describe(), job_id, e)
    for w in writers:
        try:
            w.cleanup(job_id)
        except Exception as e:  # cleanup is best effort; the error that caused it matters
            log.warning("cleanup of %s for job %d failed: %s", w.path, job_id, e)

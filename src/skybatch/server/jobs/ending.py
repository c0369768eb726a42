"""How a job ends: failed (with the failure's story and how to recover what committed),
finished by its reduce, or cancelled."""

from __future__ import annotations

import asyncio
import logging

from skybatch.errors import ConflictError, SkyBatchError
from skybatch.io import storage
from skybatch.io.registry import reader_from_spec, writer_from_spec
from skybatch.server.jobs.runtime import Runtime, cleanup, remove_made_dirs
from skybatch.server.store import JobRecord, Store
from skybatch.states import JobStatus

__all__ = ["Ending", "failure_message", "recovery_hint"]

log = logging.getLogger("skybatch.server")


class Ending:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.ctx = rt.ctx

    async def fail(self, job_id: int, reason: str | None = None) -> None:
        """Fail a running job: ``reason``, or the story of its failed batch, then the hint."""
        job = self.ctx.store.get_job(job_id)
        if job is None or job.status.finished:
            return
        message = (
            reason
            if reason is not None
            # It scans the job's batches: a big job has them by the million.
            else await asyncio.to_thread(failure_message, self.ctx.store, job)
        )
        if job_id in self.rt.finishing:
            # Another ending of the job is under way (two batches out of retries at
            # once): it alone may say when the job is settled.
            return
        self.rt.finishing.add(job_id)  # readers get the job once its error is complete
        try:
            # Stop the job first: no commit lands after this, so the counts read next
            # are final and the hint never claims more (or fewer) batches than are kept.
            if not self.ctx.store.set_job_status(
                job_id, JobStatus.FAILED, self.ctx.clock(), message
            ):
                return
            log.info("job %d failed", job_id)
            job = self.rt.get(job_id)
            hint = await asyncio.to_thread(recovery_hint, job)
            self.ctx.store.set_job_error(job_id, f"{message}\n{hint}")
            if not job.committed_batches:
                # Nothing to recover: leave no staging area behind.
                writers = self.rt.writers(job)
                self.rt.loaded_writers.pop(job_id, None)
                await asyncio.to_thread(
                    cleanup, writers, job_id, reader_from_spec(job.spec["reader"])
                )
            await asyncio.to_thread(remove_made_dirs, job.spec)
        finally:
            self.rt.finishing.discard(job_id)
            self.rt.notify(job)

    async def finish(self, job: JobRecord, status: JobStatus, message: str | None = None) -> None:
        """Record the job's final status, then remove its staging area; waiters wake after."""
        self.rt.finishing.add(job.id)
        try:
            writers = self.rt.writers(job)
            self.ctx.store.set_job_status(job.id, status, self.ctx.clock(), message)
            self.rt.loaded_writers.pop(job.id, None)
            await asyncio.to_thread(cleanup, writers, job.id, reader_from_spec(job.spec["reader"]))
            if status is not JobStatus.SUCCEEDED:
                await asyncio.to_thread(remove_made_dirs, job.spec)
        finally:
            self.rt.finishing.discard(job.id)
            self.rt.notify(job)

    async def cancel(self, job_id: int, reason: str = "cancelled") -> JobRecord:
        job = self.rt.get(job_id)
        if job.status.finished:
            raise ConflictError(f"job {job_id} already {job.status.value}; nothing to cancel")
        if job.status is JobStatus.REDUCING:
            raise ConflictError(f"job {job_id} has finished its batches and is writing its output")
        self.ctx.store.set_job_status(job_id, JobStatus.CANCELLED, self.ctx.clock(), reason)
        await asyncio.to_thread(remove_made_dirs, job.spec)
        stop = self.rt.indexing.get(job_id)
        if stop is not None:
            stop.set()
        self.rt.notify(job)
        return self.rt.get(job_id)


def failure_message(store: Store, job: JobRecord) -> str:
    """The job's first failed batch: its rows, tries, and first and last failure."""
    lines = []
    failed = store.failed_batches(job.id)
    if failed:
        batch = failed[0]
        attempts = [a for a in store.batch_attempts(job.id, batch) if a.status == "FAILED"]
        mapper_failures = [a for a in attempts if a.error_kind in ("mapper", "signal")] or attempts
        plan = store.batch_plan(job.id, batch)
        rows = f" (rows {plan.row_start}-{plan.row_start + plan.row_count - 1})" if plan else ""
        # A first death by a signal costs no retry, so without saying so the count
        # reads as a contradiction ("failed 2 times (max_retries=0)").
        free = (
            "; the first death by a signal is free"
            if any(a.error_kind == "signal" for a in mapper_failures)
            else ""
        )
        lines.append(
            f"job {job.id} ({job.name}) failed: batch {batch}{rows} failed "
            f"{len(mapper_failures)} times (max_retries={job.spec['max_retries']}{free})."
        )
        shown = [(1, mapper_failures[0])]
        if len(mapper_failures) > 1:
            shown.append((len(mapper_failures), mapper_failures[-1]))
        for n, (tries, a) in enumerate(shown):
            worker = store.get_worker(a.worker_id)
            where = f", worker {worker.index}" if worker else ""
            lines.append(f"{'First' if n == 0 else 'Last'} failure (try {tries}{where}):")
            if a.error_kind == "signal" and a.error and a.traceback:
                lines.append(a.error)  # the signal: the runner's last output does not say it
            lines.append((a.traceback or a.error or "").rstrip())
    return "\n".join(lines)


def recovery_hint(job: JobRecord) -> str:
    """How to recover what committed; checks the parts are still there (storage I/O)."""
    writers = [writer_from_spec(w) for w in job.spec["writers"]]
    if not job.committed_batches:
        return "No batch committed, so there are no partial results to recover."
    for writer in writers:
        area = writer.staging_dir(job.id)
        try:
            present = storage.exists(area, writer.storage_options)
        except SkyBatchError as e:
            return (
                f"{job.committed_batches} of {job.total_batches} batches committed, but "
                f"their parts cannot be checked ({e})"
            )
        if not present:
            return (
                f"{job.committed_batches} of {job.total_batches} batches had committed, "
                f"but their parts in {area} were removed by something other than this "
                "job, so nothing can be recovered; submit the job again"
            )
    lines = [
        f"{job.committed_batches} of {job.total_batches} batches ({job.committed_rows} of "
        f"{job.total_rows} rows) committed and kept. To recover them:"
    ]
    for writer in writers:
        lines.append(f'    skybatch.{writer!r}.reduce_results(job_id="{job.id}")')
        lines.append(f'    skybatch.{writer!r}.cleanup(job_id="{job.id}")')
    lines.append(
        f'To finish the job instead (after a fix): ds.map(..., resume="{job.id}") or '
        f"`skybatch jobs resume {job.id}`"
    )
    return "\n".join(lines)

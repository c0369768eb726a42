"""What an attempt's end does to its job: a commit (the reduce once every batch is
done), a failure (a retry, or the job's end), and a batch out of retries (the job
fails, or with ``max_failed_rows`` the batch is halved until its poison rows stand
alone)."""

from __future__ import annotations

import asyncio
import logging

from skybatch import defaults
from skybatch.batches import Place
from skybatch.errors import ConflictError, DiskFullError
from skybatch.io.registry import reader_from_spec
from skybatch.server.jobs.ending import Ending
from skybatch.server.jobs.publish import Publisher
from skybatch.server.jobs.runtime import Runtime, ready_to_reduce

__all__ = ["Outcomes"]

log = logging.getLogger("skybatch.server")


class Outcomes:
    def __init__(self, rt: Runtime, ending: Ending, publisher: Publisher) -> None:
        self.rt = rt
        self.ctx = rt.ctx
        self.ending = ending
        self.publisher = publisher

    async def commit(self, attempt: int) -> None:
        if await self.commit_many([attempt]):
            raise ConflictError(f"attempt {attempt} no longer holds its lease; discard its output")

    async def commit_many(
        self, attempts: list[int], sizes: list[list[Place] | None] | None = None
    ) -> list[int]:
        """Commit the attempts in one transaction; those refused (no longer holding
        their leases: their agent discards their output)."""
        rt = self.rt
        try:
            jobs = self.ctx.store.commit_many(attempts, self.ctx.clock(), sizes)
        except DiskFullError as e:
            rt.state_full = str(e)  # the agent tries again; running jobs show why
            raise
        rt.state_full = None
        latest = {job.id: job for job in jobs if job is not None}
        for job in latest.values():
            entries = rt.health.get(job.id, {})
            for source in [s for s in entries if s.startswith("worker-")]:
                del entries[source]  # an output was written and committed: it has space again
            rt.notify(job.id)
            if ready_to_reduce(job):
                rt.spawn(self.publisher.reduce(job.id))
        return [a for a, job in zip(attempts, jobs, strict=True) if job is None]

    async def fail(self, attempt: int, kind: str, error: str, traceback: str | None) -> None:
        res = self.ctx.store.fail(
            attempt,
            mapper_caused=kind == "mapper",
            error=error,
            traceback=traceback,
            now=self.ctx.clock(),
            max_system_failures=defaults.MAX_SYSTEM_FAILURES,
            signal=kind == "signal",
        )
        if res is None:
            raise ConflictError(f"attempt {attempt} no longer holds its lease")
        job, exhausted = res
        if kind == "input":
            # A malformed input line, found by the runner's parse (the indexer took the
            # batch unparsed): no retry mends the input, as when the indexer finds one.
            await self.ending.fail(job.id, error)
            return
        if exhausted is not None:
            await self._exhausted(job.id, exhausted)
        # Waiting lease requests recompute when the retried batch becomes ready.
        self.rt.notify(job)

    async def handle_exhausted(self, batches: list[tuple[int, int]]) -> None:
        """Batches that used up their retries elsewhere (lost workers, expired leases)."""
        for job_id, batch in batches:
            await self._exhausted(job_id, batch)

    async def _exhausted(self, job_id: int, batch: int) -> None:
        """A batch used up its retries: fail the job, or (max_failed_rows) hunt the poison rows."""
        store = self.ctx.store
        job = store.get_job(job_id)
        if job is None or job.status.finished:
            return
        limit = job.spec.get("max_failed_rows")
        plan = store.batch_plan(job_id, batch)
        if limit is None or plan is None:
            await self.ending.fail(job_id)
            return
        reader = reader_from_spec(job.spec["reader"])
        if plan.row_count > 1:
            halves = await asyncio.to_thread(reader.split, plan)
            store.split_batch(job_id, batch, halves)
            log.info(
                "job %d: batch %d split in %d to isolate failing rows", job_id, batch, len(halves)
            )
            self.rt.notify(job)
            return
        raw = await asyncio.to_thread(reader.read, plan)
        failures = [a for a in store.batch_attempts(job_id, batch) if a.error]
        last = failures[-1] if failures else None
        job = store.poison_batch(
            job_id,
            batch,
            plan.row_start,
            raw.decode(errors="replace").strip(),
            last.error if last and last.error else "failed",
            last.traceback if last else None,
        )
        if job.failed_rows > limit:
            await self.ending.fail(
                job_id,
                f"job {job_id} ({job.name}) failed: more than max_failed_rows={limit} rows "
                f"failed (the last, row {plan.row_start}: {last.error if last else 'failed'})",
            )
            return
        await self.publisher.after_progress(job_id)

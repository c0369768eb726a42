"""The end of a job's batches: reduce the committed parts into its outputs and publish
them all at once (with the errors output of its poison rows), or write what a finished
job committed on request (``reduce_results``)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

import orjson

from skybatch import defaults
from skybatch.batches import Part
from skybatch.errors import ConfigError, ConflictError, NotFoundError, OutputError, SkyBatchError
from skybatch.io import storage
from skybatch.io.base import OutputWriter
from skybatch.io.registry import writer_from_spec
from skybatch.server.jobs.ending import Ending
from skybatch.server.jobs.runtime import Runtime, ready_to_reduce, remove_made_dirs, replaceable
from skybatch.server.store import JobRecord
from skybatch.states import JobStatus

__all__ = ["Publisher"]

log = logging.getLogger("skybatch.server")


def for_writer(parts: list[Part], n: int) -> list[Part]:
    """The parts as writer number ``n`` reads them: with its own place of each."""
    return [
        dataclasses.replace(p, place=p.places[n] if p.places and n < len(p.places) else None)
        for p in parts
    ]


def lost_parts(job_id: int, writers: list[OutputWriter], parts: list[Part]) -> list[int]:
    """The batches whose local part is missing or not the size its agent wrote.

    Agents do not sync parts (see ``OutputWriter.write_part``): after a machine crash a
    committed part may be gone or cut short, which its recorded place shows."""
    lost: set[int] = set()
    for n, writer in enumerate(writers):
        if not storage.is_local(writer.staging_dir(job_id)):
            continue  # an object store's PUT is durable once answered
        lost.update(p.batch for p in for_writer(parts, n) if writer.part_lost(job_id, p))
    return sorted(lost)


class Publisher:
    def __init__(self, rt: Runtime, ending: Ending) -> None:
        self.rt = rt
        self.ctx = rt.ctx
        self.ending = ending

    async def after_progress(self, job_id: int) -> None:
        """A batch is done (or indexing is): reduce once every batch is."""
        job = self.rt.get(job_id)
        self.rt.notify(job)
        if ready_to_reduce(job):
            await self.reduce(job_id)

    def after_restart(self, job: JobRecord) -> None:
        """Finish a reduce a server restart cut short, unless restarts keep doing so."""
        # A reduce that brings the server down (a custom writer's reduce eating its
        # memory, say) would do so again at every start.
        starts = self.ctx.store.note_reduce_start(job.id, restart=True)
        if starts > defaults.MAX_INDEX_STARTS:
            message = (
                f"job {job.id} ({job.name}) could not publish its output: the reduce "
                f"was interrupted by server restarts {starts - 1} times, so it is not "
                "started again"
            )
            self.rt.spawn(self._give_up(job, message))
            return
        self.rt.spawn(self.reduce(job.id))

    async def reduce(self, job_id: int) -> None:
        # The last commit and the end of indexing can both see "all committed".
        if job_id in self.rt.reducing:
            return
        self.rt.reducing.add(job_id)
        try:
            await self._reduce_once(job_id)
        finally:
            self.rt.reducing.discard(job_id)

    async def _reduce_once(self, job_id: int) -> None:
        store = self.ctx.store
        job = store.get_job(job_id)
        if job is None or job.status not in (
            JobStatus.PENDING,
            JobStatus.RUNNING,
            JobStatus.REDUCING,
        ):
            return
        if job.status is not JobStatus.REDUCING:
            store.note_reduce_start(job_id, restart=False)
            store.set_job_status(job_id, JobStatus.REDUCING, self.ctx.clock())
            self.rt.notify(job)
        writers = self.rt.writers(job)
        begun: list[str] = []

        def publish() -> list[int]:
            # A scan of every batch, which a big job has by the million: not on the loop,
            # and in the publish's own thread trip, which a small job would feel.
            parts = store.committed_parts(job_id)
            lost = lost_parts(job_id, writers, parts)
            if not lost:
                self._publish(job, writers, parts, job.spec["overwrite"], begun)
            return lost

        try:
            lost = await asyncio.to_thread(publish)
            if lost:
                moved = store.requeue_batches(job_id, lost)
                log.warning(
                    "job %d: the parts of %d committed batches are missing or short (lost "
                    "in a machine crash before they reached the disk?); they run again",
                    job_id,
                    moved,
                )
                # Shown with the job (its progress went back) until it ends.
                self.rt.health.setdefault(job_id, {})["requeued"] = (
                    f"the parts of {moved} committed batches were missing or short (lost in "
                    "a machine crash?): those batches run again"
                )
                self.rt.notify(job)
                return
        except Exception as e:
            if isinstance(e, SkyBatchError):
                message = f"job {job_id} could not publish its output: {e}"
            else:
                log.exception("reduce of job %d failed", job_id)
                message = f"job {job_id} could not publish its output: {e!r}"
            self._claim_partial(job, begun)
            # A Sky Batch writer's uploads (public since it began) are not redone.
            await self._fail(job, message, any(w._by_upload() for w in writers))
            return
        await self.ending.finish(job, JobStatus.SUCCEEDED)
        log.info("job %d succeeded", job_id)

    async def _give_up(self, job: JobRecord, message: str) -> None:
        """Fail a reduce that will not be run again, removing what its last run left."""

        def discard() -> None:
            specs = job.spec["writers"] + ([job.spec["errors"]] if job.spec.get("errors") else [])
            for spec in specs:
                writer_from_spec(spec).staged_file(job.id).discard()

        await asyncio.to_thread(discard)
        await self._fail(job, message)

    def _claim_partial(self, job: JobRecord, begun: list[str]) -> None:
        """Outputs whose publish began are this job's own now, whole or in part: its
        resume replaces (or, for a Sky Batch writer, continues) them without overwrite."""
        fresh = [path for path in begun if path not in replaceable(job.spec)]
        if fresh:
            spec = dict(job.spec)
            spec["_partial_outputs"] = [*replaceable(spec), *fresh]
            self.ctx.store.set_job_spec(job.id, spec)

    async def _fail(self, job: JobRecord, message: str, uploads: bool = False) -> None:
        message += (
            f"\nIts committed batches are kept; fix that, then "
            f"`skybatch jobs resume {job.id}` (job.resume()) publishes the output"
        )
        if uploads:
            message += "; upload_batch continues after the last batch it accepted"
        # set_job_status refuses to move a finished job, so fail it from REDUCING here.
        self.ctx.store.set_job_status(job.id, JobStatus.FAILED, self.ctx.clock(), message)
        await asyncio.to_thread(remove_made_dirs, job.spec)
        self.rt.notify(job)

    def _publish(
        self,
        job: JobRecord,
        writers: list[OutputWriter],
        parts: list[Part],
        overwrite: bool,
        begun: list[str],
    ) -> None:
        """Stage every output, then publish them all: no output appears unless all can.
        ``begun`` gets the path of each output as its publish starts."""
        staged = []
        replace = replaceable(job.spec)
        try:
            for n, w in enumerate(writers):
                if not (overwrite or w.path in replace) and w.output_exists():
                    raise OutputError(
                        f"output {w.path} appeared while the job ran; pass overwrite=True "
                        "to replace it"
                    )
                staged.append(w.stage(job.id, for_writer(parts, n)))
            if job.spec.get("errors"):
                staged.append(self._stage_errors(job))
        except BaseException:
            for s in staged:
                s.discard()
            raise
        paths = [w.path for w in writers] + (
            [job.spec["errors"]["path"]] if job.spec.get("errors") else []
        )
        for n, s in enumerate(staged):
            begun.append(paths[n])
            try:
                s.publish()
            except BaseException:
                for rest in staged[n:]:
                    rest.discard()
                raise

    def _stage_errors(self, job: JobRecord) -> storage.Staged:
        """The errors output: one line per poison row, with its input and its failure."""
        errors = writer_from_spec(job.spec["errors"])
        staged = errors.staged_file(job.id)
        try:
            with staged.open() as out:
                for row, data, error, tb in self.ctx.store.poison_rows(job.id):
                    try:
                        value = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        value = data
                    record = {"row": row, "input": value, "error": error, "traceback": tb}
                    out.write(orjson.dumps(record) + b"\n")
        except BaseException:
            staged.discard()
            raise
        return staged

    async def reduce_partial(self, job_id: int, writer_spec: dict[str, Any]) -> dict[str, Any]:
        """Write what a finished job committed to one of its outputs; say what is missing."""
        job = self.rt.get(job_id)
        if not job.status.finished:
            raise ConflictError(
                f"job {job_id} is {job.status.value}; wait for it to end or cancel it first"
            )
        writers = self.rt.writers(job)
        number = next((n for n, w in enumerate(writers) if w.path == writer_spec.get("path")), None)
        writer = None if number is None else writers[number]
        if writer is None or number is None:
            raise ConfigError(
                f"job {job_id} did not write {writer_spec.get('path')!r}; its outputs are "
                f"{[w['path'] for w in job.spec['writers']]}"
            )

        def stage_and_publish(parts: list[Part]) -> None:
            staged = writer.stage(job_id, for_writer(parts, number))
            if isinstance(staged, storage.StagedMoves):
                staged.keep_sources = True  # the parts stay for a resume
            try:
                staged.publish()
            except BaseException:
                staged.discard()
                raise

        # The staged file's name is the job's: two reduces of one job at once would share it.
        if job_id in self.rt.reducing:
            raise ConflictError(f"job {job_id}'s output is being written already; try again")
        self.rt.reducing.add(job_id)
        try:
            # Read once the job is ours: a resume is refused until the reduce ends.
            parts = await asyncio.to_thread(self.ctx.store.committed_parts, job_id)
            # A part lost or cut short (parts are not synced) is left out, and its rows
            # reported missing: never a broken line in the output.
            lost = set(await asyncio.to_thread(lost_parts, job_id, writers, parts))
            parts = [p for p in parts if p.batch not in lost]
            await asyncio.to_thread(stage_and_publish, parts)
            # Read and written with no await between: a resume (on this loop) cannot
            # reopen the job in the middle and lose its new spec.
            job = self.rt.get(job_id)
            if job.status.finished and writer.path not in replaceable(job.spec):
                spec = dict(job.spec)
                spec["_partial_outputs"] = [*replaceable(spec), writer.path]
                self.ctx.store.set_job_spec(job_id, spec)
        finally:
            self.rt.reducing.discard(job_id)
        missing = _missing_rows(job, parts)
        return {"rows": sum(p.row_count for p in parts), "missing": missing, "path": writer.path}

    def results_path(self, job_id: int) -> Path:
        """The results of a job without outputs, once it succeeded."""
        job = self.rt.get(job_id)
        if not job.spec.get("results_in_memory"):
            outputs = ", ".join(w["path"] for w in job.spec["writers"])
            raise ConfigError(
                f"job {job_id} wrote its results to {outputs}; read them there (job.results() "
                "is for jobs without output=)"
            )
        if job.status is not JobStatus.SUCCEEDED:
            raise ConflictError(
                f"job {job_id} is {job.status.value}; its results come back when it succeeds"
            )
        path = Path(job.spec["writers"][0]["path"])
        if not path.is_file():
            raise NotFoundError(
                f"job {job_id}'s results are gone ({path} was removed, with the server's "
                "home or by hand); run the job again"
            )
        return path


def _missing_rows(job: JobRecord, parts: list[Part]) -> list[list[int]]:
    """The row ranges (first, last) no committed part holds."""
    missing: list[list[int]] = []
    row = 0
    for p in parts:
        if p.row_start > row:
            missing.append([row, p.row_start - 1])
        row = p.row_start + p.row_count
    if row < job.total_rows:
        missing.append([row, job.total_rows - 1])
    return missing

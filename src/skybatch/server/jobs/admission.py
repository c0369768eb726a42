"""Admission: a submit is checked whole (pool, specs, input, outputs) before the job
exists, then recorded with the claim on its outputs and its indexing started; a resume
reopens a failed or cancelled job only if what it ran over is still there, unchanged."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any

from skybatch.errors import ConfigError, ConflictError, NotFoundError, PoolError
from skybatch.io import storage
from skybatch.io.base import InputReader, OutputWriter
from skybatch.io.formats.jsonl import JsonReader, JsonWriter
from skybatch.io.registry import reader_from_spec, writer_from_spec
from skybatch.server.jobs.indexing import Indexer
from skybatch.server.jobs.publish import Publisher
from skybatch.server.jobs.runtime import (
    Runtime,
    cleanup,
    ready_to_reduce,
    remove_made_dirs,
    replaceable,
)
from skybatch.server.jobs.specs import (
    absent_local,
    check_same_job,
    disjoint,
    require_absolute,
    spec_field,
)
from skybatch.server.store import JobRecord, OutputClaimed, claimed_outputs, output_key
from skybatch.states import JobStatus, PoolStatus
from skybatch.wire import JobSubmit

__all__ = ["Admission"]

log = logging.getLogger("skybatch.server")


class Admission:
    def __init__(self, rt: Runtime, indexer: Indexer, publisher: Publisher) -> None:
        self.rt = rt
        self.ctx = rt.ctx
        self.indexer = indexer
        self.publisher = publisher
        self._deployment: str | None = None  # this home's id, read at the first submit

    async def submit(self, req: JobSubmit) -> JobRecord:
        store = self.ctx.store
        pool = store.get_pool(req.pool)
        if pool is None:
            names = ", ".join(p.name for p in store.list_pools()) or "none"
            raise NotFoundError(
                f"no pool named {req.pool!r} (pools: {names}); create it with "
                f"`skybatch pool apply pool.yaml --pool {req.pool}`"
            )
        if pool.status is PoolStatus.FAILED:
            raise PoolError(
                f"pool {req.pool!r} failed to set up; fix its YAML and re-apply it. {pool.error}"
            )
        if req.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {req.batch_size}")
        # Everything the request can get wrong is found before the job exists, so a
        # refused submit leaves no job (and no claim on its outputs) behind.
        specs = [(f"writers[{i}]", w) for i, w in enumerate(req.writers)]
        if req.errors:
            specs.append(("errors", req.errors))
        if req.items is None:
            specs.append(("reader", req.reader))
        for field, given in specs:
            require_absolute(field, given.get("path"))  # before from_spec resolves it here
        with spec_field("reader"):
            reader = reader_from_spec(req.reader) if req.items is None else None
        writers = []
        for i, w in enumerate(req.writers):
            with spec_field(f"writers[{i}]"):
                writers.append(writer_from_spec(w))
        errors = []
        if req.errors:
            with spec_field("errors"):
                errors.append(writer_from_spec(req.errors))
        loaded: list[tuple[str, object]] = [(f"writers[{i}]", w) for i, w in enumerate(writers)]
        loaded += [("errors", e) for e in errors]
        if reader is not None:
            loaded.append(("reader", reader))
        for field, obj in loaded:
            require_absolute(field, getattr(obj, "path", None))  # a custom class's own path

        def check_files() -> tuple[list[str], dict[str, Any] | None]:
            # Claimed as spelled by output_key: through symbolic links, and a directory
            # with what is inside it.
            keys = [output_key(w.path) for w in writers + errors]
            disjoint(keys)
            if reader is None:
                return keys, None
            with spec_field("reader"):
                reader.validate()
                return keys, reader.fingerprint()

        # One trip to a thread for all the file system calls: on a small job each trip
        # costs about as much as the calls it makes.
        paths, fingerprint = await asyncio.to_thread(check_files)
        spec = req.model_dump(exclude={"items"})
        if fingerprint is not None:
            spec["input_fingerprint"] = fingerprint
        try:
            # The claim is made in the transaction that records the job: of many
            # submits of one output, exactly one gets it.
            job_id = store.create_job(req.name, req.pool, spec, self.ctx.clock(), paths)
        except OutputClaimed as e:
            raise ConflictError(
                f"{e}; wait for it, cancel it (`skybatch jobs cancel {e.job_id}`), or choose "
                "another output"
            ) from None
        try:
            if not writers:
                # No output=: results come back to the caller (job.results()).
                writers = [JsonWriter(str(self._job_dir(job_id) / "results.jsonl"))]
                spec["writers"] = [w.to_spec() for w in writers]
                spec["results_in_memory"] = True
            self._assign_staging(spec, writers + errors)  # before anything is staged
            if req.items is not None:
                reader = await asyncio.to_thread(self._stage_items, job_id, writers[0], req.items)
                spec["items_sha256"] = hashlib.sha256(req.items.encode()).hexdigest()
                spec["input_fingerprint"] = await asyncio.to_thread(reader.fingerprint)
            assert reader is not None

            def place(reader: InputReader) -> list[str]:
                if reader.uses_scratch():
                    # Inside the first output's staging area: removed with the job's parts.
                    reader.scratch = storage.join(writers[0].staging_root(job_id), ".input")
                return absent_local(writers + errors)

            spec["_new_outputs"] = await asyncio.to_thread(place, reader)
            spec["reader"] = reader.to_spec()  # with the resolved file list and scratch area
            store.set_job_spec(job_id, spec)
            await asyncio.to_thread(_prepare, writers, errors, job_id, req.overwrite)
        except BaseException:
            await asyncio.to_thread(cleanup, writers, job_id, reader)
            await asyncio.to_thread(remove_made_dirs, spec)
            store.delete_job(job_id)
            raise
        self.rt.loaded_writers[job_id] = writers
        self.indexer.start(self.rt.get(job_id), reader)
        log.info("job %d (%s) submitted to pool %s", job_id, req.name, req.pool)
        return self.rt.get(job_id)

    async def resume(self, job_id: int, req: JobSubmit | None) -> JobRecord:
        """Run a failed or cancelled job's missing batches, then publish its outputs."""
        job = self.rt.get(job_id)
        if job.status is JobStatus.SUCCEEDED:
            raise ConflictError(f"job {job_id} already succeeded; there is nothing to resume")
        if job_id in self.rt.reducing:
            raise ConflictError(
                f"job {job_id}'s output is being written (reduce_results); try again"
            )
        if not job.status.finished:
            raise ConflictError(
                f"job {job_id} is {job.status.value}; only a failed or cancelled job resumes"
            )
        spec = dict(job.spec)
        pool_name = job.pool
        if req is not None:
            check_same_job(job, req)
            spec.update(
                name=req.name,
                mapper=req.mapper.model_dump(),
                activate_env=req.activate_env,
                max_retries=req.max_retries,
                retry_backoff=req.retry_backoff,
                batch_timeout=req.batch_timeout,
                overwrite=spec["overwrite"] or req.overwrite,
            )
            pool_name = req.pool
        pool = self.ctx.store.get_pool(pool_name)
        if pool is None or pool.status is PoolStatus.FAILED:
            raise NotFoundError(
                f"pool {pool_name!r} is not up; apply it (`skybatch pool apply pool.yaml --pool "
                f"{pool_name}`) and resume again"
            )
        reader = reader_from_spec(spec["reader"])
        writers = self.rt.writers(job)
        if spec.get("items_sha256"):
            # In-memory items: the same items (by hash) are written again if need be.
            if req is not None and req.items is not None:
                await asyncio.to_thread(self._stage_items, job_id, writers[0], req.items)
            elif not await asyncio.to_thread(
                storage.exists, reader.files()[0], writers[0].storage_options
            ):
                raise ConfigError(
                    f"job {job_id} ran over in-memory items, which were removed; resume it "
                    f"from Python: Dataset.from_items(items).map(..., resume={job_id})"
                )
        elif await asyncio.to_thread(reader.fingerprint) != spec.get("input_fingerprint"):
            raise ConfigError(
                f"input {reader.describe()} changed since job {job_id} ran, so its batches no "
                "longer line up; submit a new job instead of resuming"
            )
        if job.committed_batches and not await asyncio.to_thread(
            storage.exists, writers[0].staging_dir(job_id), writers[0].storage_options
        ):
            raise ConfigError(
                f"job {job_id}'s committed results were removed (cleanup); submit a new job"
            )
        if reader.scratch and not await asyncio.to_thread(
            storage.exists, reader.scratch, getattr(reader, "storage_options", None)
        ):
            raise ConfigError(
                f"job {job_id}'s decompressed input was removed with its staging area "
                "(nothing had committed); submit a new job"
            )
        # A partial output this job's reduce_results wrote is replaced by the complete
        # one; any other output there (a newer job's) only with overwrite=True.
        replace = replaceable(spec)

        def prepare() -> None:
            for w in writers:
                w.prepare(job_id, spec["overwrite"] or w.path in replace)

        await asyncio.to_thread(prepare)
        keys = await asyncio.to_thread(claimed_outputs, spec)  # realpath: file system calls
        try:
            reopened = self.ctx.store.reopen_job(job_id, pool_name, spec, self.ctx.clock(), keys)
        except OutputClaimed as e:
            raise ConflictError(
                f"{e}; resume job {job_id} once it ends, or cancel it "
                f"(`skybatch jobs cancel {e.job_id}`)"
            ) from None
        if not reopened:
            raise ConflictError(f"job {job_id} changed state meanwhile; try again")
        log.info("job %d resumed on pool %s", job_id, pool_name)
        job = self.rt.get(job_id)
        if not job.indexed:
            self.indexer.start(job, reader)
        elif ready_to_reduce(job):
            self.rt.spawn(self.publisher.reduce(job_id))
        self.rt.notify(job)
        return job

    def _job_dir(self, job_id: int) -> Path:
        """The server's own area for a job: in-memory inputs and results live here."""
        return self.ctx.home.root / "jobs" / str(job_id)

    def _assign_staging(self, spec: dict[str, Any], writers: list[OutputWriter]) -> None:
        """Stage a new job's outputs under this deployment's id (``_staging`` in the
        stored writer specs, read by agents): job ids repeat across deployments, and
        two deployments may write beside each other in one directory."""
        if self._deployment is None:
            self._deployment = self.ctx.home.deployment_id()
        for w in writers:
            object.__setattr__(w, "_staging", self._deployment)
        spec["writers"] = [{**w, "_staging": self._deployment} for w in spec["writers"]]
        if spec.get("errors"):
            spec["errors"] = {**spec["errors"], "_staging": self._deployment}

    def _stage_items(self, job_id: int, writer: OutputWriter, items: str) -> InputReader:
        """Dataset.from_items: the rows, as a JSONL file in the job's staging area."""
        url = storage.join(writer.staging_root(job_id), ".items.jsonl")
        storage.make_staging_root(storage.dirname(url), writer.storage_options)
        storage.write_bytes(url, items.encode(), writer.storage_options)
        reader = JsonReader(url, writer.storage_options)
        reader.validate()
        return reader


def _prepare(
    writers: list[OutputWriter], errors: list[OutputWriter], job_id: int, overwrite: bool
) -> None:
    for w in writers:
        w.prepare(job_id, overwrite)
    roots = {w.staging_root(job_id) for w in writers}
    for e in errors:
        e.prepare(job_id, overwrite)
        # The errors output stages as a hidden file beside it (publish.py), never as
        # parts, and a job's end removes only its writers' staging areas: keep none.
        if e.staging_root(job_id) not in roots:
            e.cleanup(job_id)

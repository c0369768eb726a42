"""Job lifecycle: submit, index, lease, commit, fail, cancel, reduce.

Each job is a few asyncio tasks at most (indexing and the reduce run in a
thread each, since they stream storage); leases, commits and failures are one
store transaction each, with no polling: lease requests sleep on the pool's
notifier until work appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from skybatch import defaults
from skybatch.batches import Part
from skybatch.errors import (
    ConfigError,
    ConflictError,
    DiskFullError,
    NotFoundError,
    OutputError,
    PoolError,
    SkyBatchError,
)
from skybatch.io import storage
from skybatch.io.base import InputReader, OutputWriter, reader_from_spec, writer_from_spec
from skybatch.io.files import FileReader
from skybatch.io.jsonl import JsonReader, JsonWriter
from skybatch.server.context import Context
from skybatch.server.store import (
    JobRecord,
    Lease,
    OutputClaimed,
    claimed_outputs,
    output_key,
    overlap,
)
from skybatch.states import JobStatus, PoolStatus
from skybatch.wire import JobSubmit, JobView

__all__ = ["JobService", "job_view"]

log = logging.getLogger("skybatch.server")


def job_view(job: JobRecord, health: str | None = None) -> JobView:
    return JobView(
        id=job.id,
        name=job.name,
        pool=job.pool,
        status=job.status.value,
        submitted_at=job.submitted_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        total_batches=job.total_batches,
        total_rows=job.total_rows,
        indexed=job.indexed,
        committed_batches=job.committed_batches,
        committed_rows=job.committed_rows,
        failed_batches=job.failed_batches,
        retries=job.retries,
        lost=job.lost,
        error=job.error,
        version=job.version,
        failed_rows=job.failed_rows,
        outputs=[w["path"] for w in job.spec["writers"]],
        health=health,
    )


def _log_rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def _log_sidecar(path: Path) -> Path:
    """Holds where the current log file starts in the worker's whole output."""
    return path.with_name(path.name + ".base")


def _user_spec(reader_spec: dict[str, Any]) -> dict[str, Any]:
    """A stored reader spec without what the server added (``_files``, ``_scratch``)."""
    return {k: v for k, v in reader_spec.items() if not k.startswith("_")}


def _ready_to_reduce(job: JobRecord) -> bool:
    """Every batch is indexed and done (committed, or poisoned) while the job runs."""
    return (
        job.status in (JobStatus.PENDING, JobStatus.RUNNING)
        and job.indexed
        and job.committed_batches == job.total_batches
    )


@contextlib.contextmanager
def _spec_field(field: str) -> Iterator[None]:
    """A reader or writer spec that does not load is the request's fault: say which."""
    try:
        yield
    except SkyBatchError:
        raise
    except Exception as e:  # from_spec and user classes can raise anything
        detail = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ConfigError(
            f"{field}: invalid spec ({detail}); pass a skybatch reader or writer"
        ) from None


def _require_absolute(field: str, path: object) -> None:
    """A local path must come absolute: relative to the server's working directory
    it would name a place the user never meant (the Python client resolves paths)."""
    if not isinstance(path, str):
        return
    plain = path
    if path.startswith("file://localhost/"):
        plain = path[len("file://localhost") :]
    elif path.startswith(("file://", "local://")):
        plain = path.split("://", 1)[1]
    elif "://" in path:
        return
    if not plain.startswith("/"):
        raise ConfigError(
            f"{field}.path: {path!r} is not an absolute path; send an absolute path or a "
            "URL such as s3://bucket/key"
        )


def _disjoint(keys: list[str]) -> None:
    """Two outputs of one job must not be one file, nor one inside the other."""
    for n, key in enumerate(keys):
        for earlier in keys[:n]:
            both = overlap(earlier, key)
            if both == key:
                raise ConfigError(f"two outputs of this job write {key}; give each its own path")
            if both is not None:
                raise ConfigError(
                    f"two outputs of this job overlap: {both}; give each its own path"
                )


def _absent_local(writers: list[OutputWriter]) -> list[str]:
    """The local outputs not there yet: a directory the job makes for one goes if the
    job ends without publishing (a later submit of a file there would find a directory)."""
    return [w.path for w in writers if storage.is_local(w.path) and not os.path.lexists(w.path)]


def _replaceable(spec: dict[str, Any]) -> list[str]:
    """The outputs this job's reduce_results published: its resume may replace them."""
    return list(spec.get("_partial_outputs", ()))


def _remove_made_dirs(spec: dict[str, Any]) -> None:
    for path in spec.get("_new_outputs", ()):
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only if empty: whatever else is there stays


class JobService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: dict[int, list[OutputWriter]] = {}
        self._reducing: set[int] = set()
        # Jobs whose final status is recorded but whose staging area is still being
        # removed: waiters see the end only after it, so nothing is left when ds.map returns.
        self._finishing: set[int] = set()
        # Set to stop a job's indexing thread between two blocks (cancel).
        self._indexing: dict[int, threading.Event] = {}
        self._stopping = False
        self._deployment: str | None = None  # this home's id, read at the first submit
        # What holds running jobs back without failing them (a full disk), by job and
        # source; in memory, since the state database may be what cannot be written.
        self._health: dict[int, dict[str, str]] = {}
        self._state_full: str | None = None  # state.db could not be written
        self._log_bases: dict[Path, int] = {}

    # -- helpers -------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notify(self, job: JobRecord | int, pool: str | None = None) -> None:
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
        cached = self._writers.get(job.id)
        if cached is None:
            cached = [writer_from_spec(w) for w in job.spec["writers"]]
            self._writers[job.id] = cached
        return cached

    def resume_unfinished(self) -> None:
        """After a restart: finish reduces under way, and indexing cut short."""
        loop = asyncio.get_running_loop()
        for job in self.ctx.store.list_jobs(active_only=True):
            if job.status is JobStatus.REDUCING:
                # A reduce that brings the server down (a custom writer's reduce eating
                # its memory, say) would do so again at every start.
                starts = self.ctx.store.note_reduce_start(job.id, restart=True)
                if starts > defaults.MAX_INDEX_STARTS:
                    message = (
                        f"job {job.id} ({job.name}) could not publish its output: the reduce "
                        f"was interrupted by server restarts {starts - 1} times, so it is not "
                        "started again"
                    )
                    self._spawn(self._give_up_reduce(job, message))
                    continue
                self._spawn(self._reduce(job.id))
            elif _ready_to_reduce(job):
                self._spawn(self._reduce(job.id))
            elif not job.indexed:
                reader = reader_from_spec(job.spec["reader"])
                # An input that brings the server down would do so again at every start.
                starts = self.ctx.store.note_index_start(job.id, restart=True)
                if starts > defaults.MAX_INDEX_STARTS:
                    self._spawn(
                        self._fail(
                            job.id,
                            f"job {job.id} ({job.name}) failed: indexing its input "
                            f"{reader.describe()} was interrupted by server restarts "
                            f"{starts - 1} times without finding a new batch, so it is not "
                            "started again; check the input and submit a new job, or resume "
                            f"this one (`skybatch jobs resume {job.id}`) if the restarts had "
                            "another cause",
                        )
                    )
                    continue
                self._spawn(
                    asyncio.to_thread(
                        self._index,
                        loop,
                        job.id,
                        job.pool,
                        reader,
                        job.spec["batch_size"],
                        job.planned,
                        False,
                    )
                )

    # -- submit and index ----------------------------------------------------------------

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
            _require_absolute(field, given.get("path"))  # before from_spec resolves it here
        with _spec_field("reader"):
            reader = reader_from_spec(req.reader) if req.items is None else None
        writers = []
        for i, w in enumerate(req.writers):
            with _spec_field(f"writers[{i}]"):
                writers.append(writer_from_spec(w))
        errors = []
        if req.errors:
            with _spec_field("errors"):
                errors.append(writer_from_spec(req.errors))
        loaded: list[tuple[str, object]] = [(f"writers[{i}]", w) for i, w in enumerate(writers)]
        loaded += [("errors", e) for e in errors]
        if reader is not None:
            loaded.append(("reader", reader))
        for field, obj in loaded:
            _require_absolute(field, getattr(obj, "path", None))  # a custom class's own path
        # Claimed as spelled by output_key: through symbolic links, and a directory
        # with what is inside it.
        paths = await asyncio.to_thread(lambda: [output_key(w.path) for w in writers + errors])
        _disjoint(paths)
        if reader is not None:
            with _spec_field("reader"):
                await asyncio.to_thread(reader.validate)
        spec = req.model_dump(exclude={"items"})
        if reader is not None:
            with _spec_field("reader"):
                spec["input_fingerprint"] = await asyncio.to_thread(reader.fingerprint)
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
            if await asyncio.to_thread(reader.uses_scratch):
                # Inside the first output's staging area: removed with the job's parts.
                reader.scratch = storage.join(writers[0].staging_root(job_id), ".input")
            spec["reader"] = reader.to_spec()  # with the resolved file list and scratch area
            spec["_new_outputs"] = await asyncio.to_thread(_absent_local, writers + errors)
            store.set_job_spec(job_id, spec)
            await asyncio.to_thread(self._prepare, writers + errors, job_id, req.overwrite)
        except BaseException:
            await asyncio.to_thread(self._cleanup, writers, job_id, reader)
            await asyncio.to_thread(_remove_made_dirs, spec)
            store.delete_job(job_id)
            raise
        self._writers[job_id] = writers
        loop = asyncio.get_running_loop()
        self._spawn(asyncio.to_thread(self._index, loop, job_id, req.pool, reader, req.batch_size))
        log.info("job %d (%s) submitted to pool %s", job_id, req.name, req.pool)
        return self.get(job_id)

    async def resume(self, job_id: int, req: JobSubmit | None) -> JobRecord:
        """Run a failed or cancelled job's missing batches, then publish its outputs."""
        job = self.get(job_id)
        if job.status is JobStatus.SUCCEEDED:
            raise ConflictError(f"job {job_id} already succeeded; there is nothing to resume")
        if job_id in self._reducing:
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
            self._check_same_job(job, req)
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
        writers = self.writers(job)
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
        replace = _replaceable(spec)

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
        job = self.get(job_id)
        if not job.indexed:
            loop = asyncio.get_running_loop()
            self._spawn(
                asyncio.to_thread(
                    self._index,
                    loop,
                    job_id,
                    pool_name,
                    reader,
                    spec["batch_size"],
                    job.planned,
                )
            )
        elif _ready_to_reduce(job):
            self._spawn(self._reduce(job_id))
        self._notify(job)
        return job

    @staticmethod
    def _check_same_job(job: JobRecord, req: JobSubmit) -> None:
        old = job.spec
        if req.items is not None:
            if hashlib.sha256(req.items.encode()).hexdigest() != old.get("items_sha256"):
                raise ConfigError(
                    f"job {job.id} ran over other items; resume it with the same items, or "
                    "submit a new job"
                )
        elif req.reader != _user_spec(old["reader"]):
            raise ConfigError(
                f"job {job.id} read {reader_from_spec(old['reader']).describe()}; resume it with "
                "the same input, or submit a new job"
            )
        if req.batch_size != old["batch_size"]:
            raise ConfigError(
                f"job {job.id} ran with batch_size={old['batch_size']}; resume it with the same "
                f"batch_size (got {req.batch_size}), or submit a new job"
            )
        if old.get("results_in_memory") and not req.writers:
            return
        old_paths = [w["path"] for w in old["writers"]]
        if [w.get("path") for w in req.writers] != old_paths or [
            w.get("kind") for w in req.writers
        ] != [w["kind"] for w in old["writers"]]:
            raise ConfigError(
                f"job {job.id} wrote {old_paths}; resume it with the same outputs, or submit "
                "a new job"
            )

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

    def results_path(self, job_id: int) -> Path:
        """The results of a job without outputs, once it succeeded."""
        job = self.get(job_id)
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

    @staticmethod
    def _prepare(writers: list[OutputWriter], job_id: int, overwrite: bool) -> None:
        for w in writers:
            w.prepare(job_id, overwrite)

    @staticmethod
    def _cleanup(
        writers: list[OutputWriter], job_id: int, reader: InputReader | None = None
    ) -> None:
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

    def _index(
        self,
        loop: asyncio.AbstractEventLoop,
        job_id: int,
        pool: str,
        reader: InputReader,
        batch_size: int,
        skip: int = 0,
        fresh: bool = True,
    ) -> None:
        """Stream the input once, handing batches to the scheduler as they are found.

        ``skip`` batches were recorded before a restart and are not added again;
        a start after a restart (not ``fresh``) was counted by resume_unfinished.
        """
        store = self.ctx.store
        buf = []
        flushed = time.monotonic()
        stop = threading.Event()
        self._indexing[job_id] = stop
        if isinstance(reader, FileReader):
            reader.stop = stop
        try:
            if fresh:
                store.note_index_start(job_id, restart=False)
            job = store.get_job(job_id)
            if job is None or job.status.finished:
                return  # cancelled before this thread began
            for plan in reader.plan(batch_size):
                if plan.index < skip:
                    continue
                buf.append(plan)
                # The first batch goes out at once so workers start while indexing goes on.
                if (
                    plan.index == 0
                    or len(buf) >= defaults.INDEX_FLUSH_BATCHES
                    or time.monotonic() - flushed > 0.2
                ):
                    job = store.get_job(job_id)
                    if job is None or job.status.finished:
                        return
                    store.add_batches(job_id, buf, done=False)
                    buf = []
                    flushed = time.monotonic()
                    self.ctx.notifier.notify_threadsafe(("pool", pool))
            if stop.is_set():
                log.info("indexing job %d stopped", job_id)
                if self._stopping:
                    # A clean shutdown is no crash: the next start must not count it as one.
                    store.note_index_start(job_id, restart=False)
                return
            store.add_batches(job_id, buf, done=True)
        except SkyBatchError as e:
            asyncio.run_coroutine_threadsafe(self._fail(job_id, str(e)), loop)
            return
        except Exception as e:
            log.exception("indexing job %d failed", job_id)
            asyncio.run_coroutine_threadsafe(
                self._fail(job_id, f"reading the input failed: {type(e).__name__}: {e}"), loop
            )
            return
        finally:
            if self._indexing.get(job_id) is stop:
                del self._indexing[job_id]
        self.ctx.notifier.notify_threadsafe(("pool", pool))
        asyncio.run_coroutine_threadsafe(self._after_progress(job_id), loop)

    # -- leases, commits, failures ---------------------------------------------------------

    async def lease(self, worker_id: int, pool: str, prefetch: bool, wait: float) -> Lease | None:
        store, key = self.ctx.store, ("pool", pool)
        deadline = self.ctx.clock() + wait
        while True:
            # A prefetch must not take a batch that an idle worker is waiting for.
            if prefetch and self.ctx.notifier.waiting(key):
                return None
            now = self.ctx.clock()
            lease = store.lease(pool, worker_id, now, defaults.LEASE_TTL)
            if lease is not None:
                self.ctx.notifier.notify(("job", lease.job_id))
                return lease
            if prefetch:
                return None
            timeout = deadline - now
            ready_at = store.next_ready_at(pool, now)
            if ready_at is not None:
                timeout = min(timeout, ready_at - now + 0.001)
            if timeout <= 0 or self.ctx.notifier.closed:
                return None
            await self.ctx.notifier.wait(key, timeout)
            # The route checked the worker; a long wait may have outlived it.
            worker = store.get_worker(worker_id)
            if worker is None or not worker.status.live:
                raise ConflictError(f"worker {worker_id} is not part of a live pool; exit")

    async def commit(self, attempt: int) -> None:
        try:
            job = self.ctx.store.commit(attempt, self.ctx.clock())
        except DiskFullError as e:
            self._state_full = str(e)  # the agent tries again; running jobs show why
            raise
        self._state_full = None
        if job is None:
            raise ConflictError(f"attempt {attempt} no longer holds its lease; discard its output")
        entries = self._health.get(job.id, {})
        for source in [s for s in entries if s.startswith("worker-")]:
            del entries[source]  # an output was written and committed: it has space again
        self._notify(job.id)
        if _ready_to_reduce(job):
            self._spawn(self._reduce(job.id))

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
        if exhausted is not None:
            await self._exhausted(job.id, exhausted)
        # Waiting lease requests recompute when the retried batch becomes ready.
        self._notify(job)

    async def handle_exhausted(self, batches: list[tuple[int, int]]) -> None:
        for job_id, batch in batches:
            await self._exhausted(job_id, batch)

    async def _exhausted(self, job_id: int, batch: int) -> None:
        """A batch used up its retries: fail the job, or (max_failed_rows) hunt the poison rows."""
        job = self.ctx.store.get_job(job_id)
        if job is None or job.status.finished:
            return
        limit = job.spec.get("max_failed_rows")
        plan = self.ctx.store.batch_plan(job_id, batch)
        if limit is None or plan is None:
            await self._fail(job_id)
            return
        reader = reader_from_spec(job.spec["reader"])
        if plan.row_count > 1:
            halves = await asyncio.to_thread(reader.split, plan)
            self.ctx.store.split_batch(job_id, batch, halves)
            log.info(
                "job %d: batch %d split in %d to isolate failing rows", job_id, batch, len(halves)
            )
            self._notify(job)
            return
        raw = await asyncio.to_thread(reader.read, plan)
        failures = [a for a in self.ctx.store.batch_attempts(job_id, batch) if a.error]
        last = failures[-1] if failures else None
        job = self.ctx.store.poison_batch(
            job_id,
            batch,
            plan.row_start,
            raw.decode(errors="replace").strip(),
            last.error if last and last.error else "failed",
            last.traceback if last else None,
        )
        if job.failed_rows > limit:
            await self._fail(
                job_id,
                f"job {job_id} ({job.name}) failed: more than max_failed_rows={limit} rows "
                f"failed (the last, row {plan.row_start}: {last.error if last else 'failed'})",
            )
            return
        await self._after_progress(job_id)

    async def _after_progress(self, job_id: int) -> None:
        job = self.get(job_id)
        self._notify(job)
        if _ready_to_reduce(job):
            await self._reduce(job_id)

    # -- ending a job ------------------------------------------------------------------

    def _failure_message(self, job: JobRecord) -> str:
        store = self.ctx.store
        lines = []
        failed = store.failed_batches(job.id)
        if failed:
            batch = failed[0]
            attempts = [a for a in store.batch_attempts(job.id, batch) if a.status == "FAILED"]
            mapper_failures = [
                a for a in attempts if a.error_kind in ("mapper", "signal")
            ] or attempts
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

    def _recovery_hint(self, job: JobRecord) -> str:
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

    async def _fail(self, job_id: int, reason: str | None = None) -> None:
        job = self.ctx.store.get_job(job_id)
        if job is None or job.status.finished:
            return
        message = reason if reason is not None else self._failure_message(job)
        self._finishing.add(job_id)  # readers get the job once its error is complete
        try:
            # Stop the job first: no commit lands after this, so the counts read next
            # are final and the hint never claims more (or fewer) batches than are kept.
            if not self.ctx.store.set_job_status(
                job_id, JobStatus.FAILED, self.ctx.clock(), message
            ):
                return
            log.info("job %d failed", job_id)
            job = self.get(job_id)
            hint = await asyncio.to_thread(self._recovery_hint, job)
            self.ctx.store.set_job_error(job_id, f"{message}\n{hint}")
            if not job.committed_batches:
                # Nothing to recover: leave no staging area behind.
                writers = self.writers(job)
                self._writers.pop(job_id, None)
                await asyncio.to_thread(
                    self._cleanup, writers, job_id, reader_from_spec(job.spec["reader"])
                )
            await asyncio.to_thread(_remove_made_dirs, job.spec)
        finally:
            self._finishing.discard(job_id)
            self._notify(job)

    async def _finish(self, job: JobRecord, status: JobStatus, message: str | None = None) -> None:
        """Record the job's final status, then remove its staging area; waiters wake after."""
        self._finishing.add(job.id)
        try:
            writers = self.writers(job)
            self.ctx.store.set_job_status(job.id, status, self.ctx.clock(), message)
            self._writers.pop(job.id, None)
            await asyncio.to_thread(
                self._cleanup, writers, job.id, reader_from_spec(job.spec["reader"])
            )
            if status is not JobStatus.SUCCEEDED:
                await asyncio.to_thread(_remove_made_dirs, job.spec)
        finally:
            self._finishing.discard(job.id)
            self._notify(job)

    def stop_indexing(self) -> None:
        """At shutdown: end every indexing thread at its next block, so the process exits."""
        self._stopping = True
        for stop in list(self._indexing.values()):
            stop.set()

    async def cancel(self, job_id: int, reason: str = "cancelled") -> JobRecord:
        job = self.get(job_id)
        if job.status.finished:
            raise ConflictError(f"job {job_id} already {job.status.value}; nothing to cancel")
        if job.status is JobStatus.REDUCING:
            raise ConflictError(f"job {job_id} has finished its batches and is writing its output")
        self.ctx.store.set_job_status(job_id, JobStatus.CANCELLED, self.ctx.clock(), reason)
        await asyncio.to_thread(_remove_made_dirs, job.spec)
        stop = self._indexing.get(job_id)
        if stop is not None:
            stop.set()
        self._notify(job)
        return self.get(job_id)

    async def _reduce(self, job_id: int) -> None:
        # The last commit and the end of indexing can both see "all committed".
        if job_id in self._reducing:
            return
        self._reducing.add(job_id)
        try:
            await self._reduce_once(job_id)
        finally:
            self._reducing.discard(job_id)

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
            self._notify(job)
        writers = self.writers(job)
        parts = store.committed_parts(job_id)
        try:
            await asyncio.to_thread(self._publish, job, writers, parts, job.spec["overwrite"])
        except SkyBatchError as e:
            await self._fail_reduce(job, f"job {job_id} could not publish its output: {e}")
            return
        except Exception as e:
            log.exception("reduce of job %d failed", job_id)
            await self._fail_reduce(job, f"job {job_id} could not publish its output: {e!r}")
            return
        await self._finish(job, JobStatus.SUCCEEDED)
        log.info("job %d succeeded", job_id)

    async def _give_up_reduce(self, job: JobRecord, message: str) -> None:
        """Fail a reduce that will not be run again, removing what its last run left."""

        def discard() -> None:
            specs = job.spec["writers"] + ([job.spec["errors"]] if job.spec.get("errors") else [])
            for spec in specs:
                writer_from_spec(spec).staged_file(job.id).discard()

        await asyncio.to_thread(discard)
        await self._fail_reduce(job, message)

    async def _fail_reduce(self, job: JobRecord, message: str) -> None:
        message += (
            f"\nIts committed batches are kept; fix that, then "
            f"`skybatch jobs resume {job.id}` writes the output again"
        )
        # set_job_status refuses to move a finished job, so fail it from REDUCING here.
        self.ctx.store.set_job_status(job.id, JobStatus.FAILED, self.ctx.clock(), message)
        await asyncio.to_thread(_remove_made_dirs, job.spec)
        self._notify(job)

    def _publish(
        self, job: JobRecord, writers: list[OutputWriter], parts: list[Part], overwrite: bool
    ) -> None:
        """Stage every output, then publish them all: no output appears unless all can."""
        staged = []
        replace = _replaceable(job.spec)
        try:
            for w in writers:
                if not (overwrite or w.path in replace) and w.output_exists():
                    raise OutputError(
                        f"output {w.path} appeared while the job ran; pass overwrite=True "
                        "to replace it"
                    )
                staged.append(w.stage(job.id, parts))
            if job.spec.get("errors"):
                staged.append(self._stage_errors(job))
        except BaseException:
            for s in staged:
                s.discard()
            raise
        for n, s in enumerate(staged):
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
        job = self.get(job_id)
        if not job.status.finished:
            raise ConflictError(
                f"job {job_id} is {job.status.value}; wait for it to end or cancel it first"
            )
        writer = next((w for w in self.writers(job) if w.path == writer_spec.get("path")), None)
        if writer is None:
            raise ConfigError(
                f"job {job_id} did not write {writer_spec.get('path')!r}; its outputs are "
                f"{[w['path'] for w in job.spec['writers']]}"
            )
        parts = self.ctx.store.committed_parts(job_id)

        def stage_and_publish() -> None:
            staged = writer.stage(job_id, parts)
            if isinstance(staged, storage.StagedMoves):
                staged.keep_sources = True  # the parts stay for a resume
            try:
                staged.publish()
            except BaseException:
                staged.discard()
                raise

        # The staged file's name is the job's: two reduces of one job at once would share it.
        if job_id in self._reducing:
            raise ConflictError(f"job {job_id}'s output is being written already; try again")
        self._reducing.add(job_id)
        try:
            await asyncio.to_thread(stage_and_publish)
            # Read and written with no await between: a resume (on this loop) cannot
            # reopen the job in the middle and lose its new spec.
            job = self.get(job_id)
            if job.status.finished and writer.path not in _replaceable(job.spec):
                spec = dict(job.spec)
                spec["_partial_outputs"] = [*_replaceable(spec), writer.path]
                self.ctx.store.set_job_spec(job_id, spec)
        finally:
            self._reducing.discard(job_id)
        missing = self._missing_rows(job, parts)
        return {"rows": sum(p.row_count for p in parts), "missing": missing, "path": writer.path}

    def _missing_rows(self, job: JobRecord, parts: list[Part]) -> list[list[int]]:
        missing: list[list[int]] = []
        row = 0
        for p in parts:
            if p.row_start > row:
                missing.append([row, p.row_start - 1])
            row = p.row_start + p.row_count
        if row < job.total_rows:
            missing.append([row, job.total_rows - 1])
        return missing

    # -- waiting and logs ------------------------------------------------------------------

    async def wait(self, job_id: int, version: int, timeout: float) -> JobRecord:
        deadline = time.monotonic() + timeout
        job = self.get(job_id)
        while job_id in self._finishing and time.monotonic() < deadline:
            await self.ctx.notifier.wait(("job", job_id), deadline - time.monotonic())
            job = self.get(job_id)
        if job.version != version or job.status.finished:
            return job
        await self.ctx.notifier.wait(("job", job_id), max(0.0, deadline - time.monotonic()))
        return self.get(job_id)

    # -- health ------------------------------------------------------------------------

    def health(self, job_id: int) -> str | None:
        """What holds the job back now (a full disk), in one line; None if nothing."""
        problems = list(self._health.get(job_id, {}).values())
        if self._state_full is not None:
            problems.insert(0, self._state_full)
        return "; ".join(problems) or None

    async def settled(self, job_id: int) -> JobRecord:
        """The job as its owner may act on it: one whose final status is recorded but
        whose staging area is still being removed (moments) is answered after that."""
        deadline = time.monotonic() + 30
        while job_id in self._finishing and time.monotonic() < deadline:
            await self.ctx.notifier.wait(("job", job_id), deadline - time.monotonic())
        return self.get(job_id)

    def view(self, job: JobRecord) -> JobView:
        return job_view(job, None if job.status.finished else self.health(job.id))

    def set_health(self, job_id: int, source: str, message: str | None) -> None:
        entries = self._health.get(job_id, {})
        if entries.get(source) == message:
            return
        if message is None:
            del entries[source]
        else:
            entries[source] = message
        if entries:
            self._health[job_id] = entries
        else:
            self._health.pop(job_id, None)
        self._notify(job_id)  # followers (the progress bar) see it at once

    def report_health(self, job_id: int, worker_index: int, message: str | None) -> None:
        """An agent's word on what holds its batch of the job back (None: nothing now)."""
        self.get(job_id)
        self.set_health(job_id, f"worker-{worker_index}", message)

    # -- logs ----------------------------------------------------------------------------

    def _log_base(self, path: Path) -> int:
        """Where ``path`` (a worker's current log) starts in all of that worker's output."""
        base = self._log_bases.get(path)
        if base is None:
            try:
                base = int(_log_sidecar(path).read_text())
            except (OSError, ValueError):
                base = 0
            self._log_bases[path] = base
        return base

    def _rotate_log(self, path: Path, size: int) -> None:
        """The current log becomes the rotated one; the rotated one before is dropped."""
        base = self._log_base(path) + size
        sidecar = _log_sidecar(path)
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        tmp.write_text(str(base))
        os.replace(tmp, sidecar)
        os.replace(path, _log_rotated(path))
        self._log_bases[path] = base

    def append_log(self, job_id: int, worker_index: int, data: bytes) -> None:
        """Add to a worker's log of the job: at most ``LOG_FILE_BYTES`` in the current
        file plus one rotated file. A full disk answers 507 and shows on the job."""
        self.get(job_id)
        path = self.ctx.home.job_log(job_id, worker_index)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                size = f.tell()
                rotate = size > 0 and size + len(data) > defaults.LOG_FILE_BYTES
                if not rotate:
                    try:
                        f.write(data)
                        f.flush()
                    except OSError:
                        with contextlib.suppress(OSError):
                            f.truncate(size)  # no half chunk: the agent counts it as dropped
                        raise
            if rotate:
                self._rotate_log(path, size)
                with open(path, "ab") as f:
                    f.write(data)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            message = (
                f"cannot write the job's log {path}: no space left on device; free space "
                "there (the mapper's output is dropped meanwhile, and counted)"
            )
            self.set_health(job_id, "logs", message)
            raise DiskFullError(message) from None
        self.set_health(job_id, "logs", None)
        self.ctx.notifier.notify(("log", job_id))

    def read_logs(
        self, job_id: int, worker: int | None, offsets: dict[int, int]
    ) -> tuple[list[tuple[int, bytes, int, bool]], JobRecord]:
        """New log bytes per worker from the given offsets: (worker, data, next offset,
        whether there is more to read now), at most ``LOG_PAGE_BYTES`` in all.

        Offsets count all of a worker's output, rotated and dropped included, so they
        stay valid across rotations. While the job runs only whole lines are
        returned, so a follower never splits a line (or a UTF-8 character) in two.
        """
        job = self.get(job_id)
        root = self.ctx.home.job_log(job_id, 0).parent
        if not root.exists():
            return [], job
        paths = {int(p.stem.split("-", 1)[1]): p for p in root.glob("worker-*.log")}
        chunks = []
        budget = defaults.LOG_PAGE_BYTES
        for index, path in sorted(paths.items()):
            if worker is not None and index != worker:
                continue
            offset = offsets.get(index, 0)
            if budget <= 0:
                chunks.append((index, b"", offset, True))
                continue
            data, end, more = self._read_log(path, offset, not job.status.finished, budget)
            budget -= len(data)
            chunks.append((index, data, end, more))
        return chunks, job

    def _read_log(
        self, path: Path, offset: int, whole_lines: bool, page: int
    ) -> tuple[bytes, int, bool]:
        base = self._log_base(path)
        rotated = _log_rotated(path)
        try:
            start = base - rotated.stat().st_size  # the oldest byte still kept
        except OSError:
            start = base
        note = b""
        if offset < start:
            cap = defaults.LOG_FILE_BYTES
            note = (
                f"[skybatch: {start - offset} bytes of this worker's output were dropped here; "
                f"the server keeps its last {cap} to {2 * cap} bytes per job "
                "(SKYBATCH_LOG_FILE_BYTES)]\n"
            ).encode()
            offset = start
        from_rotated = offset < base
        try:
            with open(rotated if from_rotated else path, "rb") as f:
                f.seek(offset - (start if from_rotated else base))
                data = f.read(page)
        except FileNotFoundError:
            data = b""
        full_page = len(data) == page
        if full_page or (whole_lines and not from_rotated):
            cut = data.rfind(b"\n") + 1
            if cut:
                data = data[:cut]
            elif not full_page:
                data = b""  # a line still being written
        return note + data, offset + len(data), full_page or from_rotated

"""The relay: local files of the server's machine for workers that cannot see them.

Agents started with ``SKYBATCH_RELAY=1`` (by providers whose workers run elsewhere:
SSH hosts, a Ray cluster) read a batch whose input is a local path, and write a part
whose output is a local path, through the server, over their usual connection:

- ``GET /v1/agent/jobs/<job>/batches/<batch>/input?attempt=<a>``: the batch's payload,
  exactly what the reader's ``read`` returns, read by the server. A byte-range payload
  (JSONL, CSV) is streamed from the file in blocks; a computed one (Parquet rows) is
  built in a thread and sent whole, no bigger than what a worker holds anyway.
- ``POST /v1/agent/attempts/<a>/part?job=<job>&batch=<batch>&path=<part path>``: a
  part's bytes (as the writer encoded them on the worker), streamed into the part
  file in blocks, synced like a part the worker writes itself.

The agent names nothing the server does not check: the attempt must hold the batch's
lease in a running job, and the path must be that attempt's part path of one of the
job's local outputs, compared as a string with what the server computes; anything
else is refused with the path named and nothing written. Object-store URLs are never
relayed: workers reach those themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from skybatch.batches import BatchPlan
from skybatch.errors import ConfigError, ConflictError, InputError, OutputError, SkyBatchError
from skybatch.io import storage
from skybatch.io.base import InputReader, OutputWriter
from skybatch.io.registry import reader_from_spec, writer_from_spec
from skybatch.server.context import Context
from skybatch.server.store import JobRecord
from skybatch.states import JobStatus
from skybatch.wire import INT64_MAX

__all__ = ["BLOCK", "Relay", "RelayRefused"]

log = logging.getLogger("skybatch.server")

#: Bytes read from an input, or gathered from an upload before a write, per step: the
#: server's memory per relayed batch, whatever the batch's size.
BLOCK = 1024 * 1024
#: Uploads of parts that are not one file (images) are held whole; at most this many.
_WHOLE_UPLOADS = 2


class RelayRefused(SkyBatchError):
    """An agent asked for a path that is not its attempt's to write."""

    http_status = 403


def _error(e: SkyBatchError) -> Response:
    body: dict[str, Any] = {"type": type(e).__name__, "message": str(e)}
    if _disk_full(e):
        body["disk_full"] = True  # the agent keeps its lease and tries again, as it would
    return Response(
        orjson.dumps({"error": body}), status_code=e.http_status, media_type="application/json"
    )


def _disk_full(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _int(value: str | None, name: str) -> int:
    try:
        number = int(value or "")
    except ValueError:
        raise ConfigError(f"{name} must be an integer") from None
    if not 0 <= number <= INT64_MAX:  # past it SQLite would overflow
        raise ConfigError(f"{name} must be an integer from 0 to {INT64_MAX}, got {number}")
    return number


class _Loaded:
    """A job's reader and writers as the server loaded them for relaying, with the
    specs they came from (a resume may change the spec)."""

    def __init__(self, job: JobRecord) -> None:
        self.reader_spec = job.spec["reader"]
        self.writer_specs = job.spec["writers"]
        self.reader: InputReader | None = None
        self.writers: list[OutputWriter] = [writer_from_spec(w) for w in self.writer_specs]

    def current(self, job: JobRecord) -> bool:
        return self.reader_spec == job.spec["reader"] and self.writer_specs == job.spec["writers"]


class Relay:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._loaded: dict[int, _Loaded] = {}
        self._whole = asyncio.Semaphore(_WHOLE_UPLOADS)
        #: Bytes relayed since the server started: input served, parts received.
        self.bytes_in = 0
        self.bytes_out = 0

    # -- shared checks ---------------------------------------------------------------------

    def _lease(self, job_id: int, batch: int, attempt: int) -> tuple[JobRecord, BatchPlan]:
        """The job and batch plan if ``attempt`` holds ``batch`` of running job ``job_id``."""
        store = self.ctx.store
        job = store.get_job(job_id)
        if job is None or job.status is not JobStatus.RUNNING:
            raise ConflictError(f"job {job_id} is not running")
        held = any(
            a.id == attempt and a.status == "LEASED" for a in store.batch_attempts(job_id, batch)
        )
        plan = store.batch_plan(job_id, batch) if held else None
        if plan is None:
            raise ConflictError(
                f"attempt {attempt} does not hold batch {batch} of job {job_id} (revoked, "
                "finished or never leased)"
            )
        return job, plan

    def _load(self, job: JobRecord) -> _Loaded:
        loaded = self._loaded.get(job.id)
        if loaded is None or not loaded.current(job):
            # A job's outputs and input are loaded once; the table holds running jobs only.
            for old in [j for j in self._loaded if j != job.id]:
                stale = self.ctx.store.get_job(old)
                if stale is None or stale.status is not JobStatus.RUNNING:
                    del self._loaded[old]
            loaded = self._loaded[job.id] = _Loaded(job)
        return loaded

    # -- input -----------------------------------------------------------------------------

    async def input(self, request: Request) -> Response:
        try:
            job_id = _int(request.path_params["job"], "job")
            batch = _int(request.path_params["batch"], "batch")
            attempt = _int(request.query_params.get("attempt"), "attempt")
            job, plan = self._lease(job_id, batch, attempt)
            loaded = self._load(job)
            if loaded.reader is None:
                loaded.reader = reader_from_spec(loaded.reader_spec)
            reader = loaded.reader
            url = reader.source_url(plan)
            if url is None or not storage.is_local(url):
                raise ConfigError(
                    f"batch {batch} of job {job_id} is not read from a local path of the "
                    f"server ({url or reader.describe()}); the worker reads it itself"
                )
            ranged = reader.payload_range(plan)
            if ranged is None:
                payload = await asyncio.to_thread(reader.read, plan)
                self.bytes_in += len(payload)
                return Response(payload, media_type="application/octet-stream")
            prefix, path, start, end = ranged
            f = await asyncio.to_thread(_open_range, path, end)
        except SkyBatchError as e:
            return _error(e)
        self.bytes_in += len(prefix) + end - start
        return StreamingResponse(
            self._stream(f, path, prefix, start, end),
            media_type="application/octet-stream",
            headers={"content-length": str(len(prefix) + end - start)},
        )

    async def _stream(
        self, f: Any, path: str, prefix: bytes, start: int, end: int
    ) -> AsyncIterator[bytes]:
        try:
            if prefix:
                yield prefix
            at = start
            while at < end:
                block = await asyncio.to_thread(os.pread, f.fileno(), min(BLOCK, end - at), at)
                if not block:
                    # The file shrank since it was checked: the answer ends short, which
                    # the agent's client sees (the length was declared) and asks again.
                    log.warning("relay: %s became shorter while it was read", path)
                    return
                at += len(block)
                yield block
        except OSError as e:
            log.warning("relay: reading %s failed: %s", path, e.strerror or e)
        finally:
            f.close()

    # -- parts -----------------------------------------------------------------------------

    async def part(self, request: Request) -> Response:
        try:
            attempt = _int(request.path_params["attempt"], "attempt")
            job_id = _int(request.query_params.get("job"), "job")
            batch = _int(request.query_params.get("batch"), "batch")
            path = request.query_params.get("path") or ""
            job, _ = self._lease(job_id, batch, attempt)
            writer = self._writer_of(self._load(job), job_id, batch, attempt, path)
            if writer.part_is_file:
                received = await self._write_streamed(request, writer, path)
            else:
                async with self._whole:
                    data = await request.body()
                    await asyncio.to_thread(writer.write_part, job_id, batch, attempt, data)
                received = len(data)
        except SkyBatchError as e:
            return _error(e)
        except ClientDisconnect:
            # The agent went away mid-upload (killed, cut off): its half part is gone, and
            # the batch goes to another attempt. Nobody is left to answer.
            log.info("relay: a part upload of job %s batch %s ended early", job_id, batch)
            return Response(status_code=400)
        self.bytes_out += received
        return Response(b'{"ok":true}', media_type="application/json")

    def _writer_of(
        self, loaded: _Loaded, job_id: int, batch: int, attempt: int, path: str
    ) -> OutputWriter:
        """The job's output whose part of this attempt is ``path``; else refused."""
        for writer in loaded.writers:
            if writer.part_path(job_id, batch, attempt) == path:
                if not storage.is_local(writer.path):
                    raise ConfigError(
                        f"{writer.path} is not a local path of the server; workers write "
                        "its parts themselves"
                    )
                return writer
        raise RelayRefused(
            f"refused to write {path!r}: it is not a part of attempt {attempt} (batch {batch} "
            f"of job {job_id}); its parts go to "
            + ", ".join(w.part_path(job_id, batch, attempt) for w in loaded.writers)
        )

    async def _write_streamed(self, request: Request, writer: OutputWriter, path: str) -> int:
        """The request's body into the part file at ``path``, a block at a time, synced
        (file and name) before the answer, as ``storage.write_bytes(sync=True)`` does."""
        f = await asyncio.to_thread(_create, path, writer.path)
        size = 0
        try:
            held: list[bytes] = []
            gathered = 0
            async for chunk in request.stream():
                held.append(chunk)
                gathered += len(chunk)
                if gathered >= BLOCK:
                    await asyncio.to_thread(_write, f, b"".join(held), writer.path)
                    size += gathered
                    held, gathered = [], 0
            if gathered:
                await asyncio.to_thread(_write, f, b"".join(held), writer.path)
                size += gathered
            await asyncio.to_thread(_sync_close, f, path, writer.path)
        except BaseException:
            # Half a part is no part: a retried upload makes it afresh. (Closing flushes
            # what is buffered, which fails again on a full disk; the file closes anyway.)
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return size


def _open_range(path: str, end: int) -> Any:
    with storage.translate_errors(path, "read", InputError):
        f = open(path, "rb")  # noqa: SIM115 - closed by the stream that reads it
        try:
            size = os.fstat(f.fileno()).st_size
        except BaseException:
            f.close()
            raise
    if size < end:
        f.close()
        raise InputError(
            f"cannot read {path}: it has {size} bytes, the batch ends at byte {end}; the "
            "input changed since the job was submitted"
        )
    return f


def _create(path: str, url: str) -> Any:
    with storage.translate_errors(url, "write", OutputError):
        return os.fdopen(storage.create_local(path, url), "wb")


def _write(f: Any, data: bytes, url: str) -> None:
    with storage.translate_errors(url, "write", OutputError):
        f.write(data)


def _sync_close(f: Any, path: str, url: str) -> None:
    with storage.translate_errors(url, "write", OutputError):
        f.flush()
        os.fsync(f.fileno())
        f.close()
        storage.fsync_dir(os.path.dirname(path))

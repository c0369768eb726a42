"""``Dataset.map`` and the ``Job`` handle it returns."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

from skybatch import defaults
from skybatch.client.api import Client, ServerUnreachable
from skybatch.client.progress import JobProgress
from skybatch.client.remote import RemoteFunction, remote_function
from skybatch.errors import ConfigError, JobCancelledError, JobFailedError
from skybatch.io.base import InputReader, OutputWriter
from skybatch.io.formats.jsonl import JsonWriter
from skybatch.states import JobStatus
from skybatch.wire import JobView

__all__ = ["Dataset", "Job", "format_log_chunk"]

#: How long a client rides out a server that went away before giving up.
RECONNECT_WINDOW = 120.0
#: Least time between two progress updates of a waiting client.
PROGRESS_INTERVAL = 0.1


class Job:
    """A submitted job. ``wait()`` blocks until it ends; ``status()`` and ``cancel()`` do not.

    It also stands for its id, which is what Sky Batch's ``ds.map`` returns: ``int(job)``,
    ``str(job)`` and f-strings give the id, and ``job == 5`` and ``job == "5"`` hold.
    """

    def __init__(self, job_id: str | int, client: Client | None = None) -> None:
        self.job_id = str(job_id)
        self._client = client

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client.connect()
        return self._client

    def __repr__(self) -> str:
        return f"Job({self.job_id!r})"

    def __str__(self) -> str:
        return self.job_id

    def __format__(self, spec: str) -> str:
        return format(self.job_id, spec)

    def __int__(self) -> int:
        return int(self.job_id)

    def __index__(self) -> int:
        return int(self.job_id)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Job):
            return self.job_id == other.job_id
        if isinstance(other, bool):
            return False
        if isinstance(other, (int, str)):
            return self.job_id == str(other)
        return NotImplemented

    def __hash__(self) -> int:
        # Equal to its id's int and str, so it hashes as the int: ids are digits only.
        return hash(int(self.job_id)) if self.job_id.isdigit() else hash(self.job_id)

    def info(self) -> JobView:
        return JobView.model_validate(self.client.get_job(self.job_id))

    def status(self) -> JobStatus:
        return JobStatus(self.info().status)

    def cancel(self) -> None:
        self.client.cancel(self.job_id)

    def results(self) -> list[dict[str, Any]]:
        """The result rows of a succeeded job without ``output=``, in input order."""
        data = self.client.request("GET", f"/v1/jobs/{self.job_id}/results", timeout=600).content
        return [orjson.loads(line) for line in data.splitlines() if line]

    def resume(self, stream: bool = True) -> Job:
        """Run the batches this failed or cancelled job did not commit, then publish."""
        self.client.resume(self.job_id, None)
        if stream:
            self.wait(progress=True)
        return self

    def logs(self, worker: int | None = None) -> str:
        """The mapper's output so far; each line tagged with its worker unless one is named."""
        texts: list[str] = []
        offsets: dict[int, int] = {}
        while True:  # replies are paged
            reply = self.client.logs(self.job_id, worker, offsets)
            for c in reply["chunks"]:
                texts.append(format_log_chunk(c, tag=worker is None))
                offsets[c["worker"]] = c["offset"]
            if not reply.get("more"):
                return "".join(texts)

    def wait(self, timeout: float | None = None, progress: bool = False) -> Job:
        """Block until the job ends; raise if it failed or was cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        view: dict[str, Any] | None = None
        try:
            while True:
                version = view["version"] if view else -1
                poll = 30.0
                if deadline is not None:
                    poll = max(0.0, min(poll, deadline - time.monotonic()))
                # The server answers the job's end at once, and a change only once this
                # much time has passed: a bar's updates are spaced without a sleep here
                # that would hold the end back; without one, only the end matters.
                interval = (PROGRESS_INTERVAL if view else 0.0) if progress else poll
                asked = time.monotonic()
                try:
                    view = self.client.get_job(
                        self.job_id, version=version, wait=poll, interval=interval
                    )
                except ServerUnreachable:
                    # The server may be restarting: ride it out.
                    self.client.reconnect(time.monotonic() + RECONNECT_WINDOW)
                    continue
                if progress:
                    if bar is None:
                        bar = JobProgress(self.job_id, view["name"])
                    bar.update(view)
                if JobStatus(view["status"]).finished:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.job_id} is still {view['status']}")
                # A server older than ``interval`` answers every change (every commit)
                # at once: ten updates a second are enough.
                early = min(interval, PROGRESS_INTERVAL) - (time.monotonic() - asked)
                if early > 0:
                    time.sleep(early)
        finally:
            if bar is not None:
                bar.close()
        status = JobStatus(view["status"])
        if status is JobStatus.FAILED:
            raise JobFailedError(view["error"] or f"job {self.job_id} failed", self.job_id)
        if status is JobStatus.CANCELLED:
            raise JobCancelledError(
                f"job {self.job_id} was cancelled ({view['error'] or 'cancelled'}); "
                f"{view['committed_rows']} of {view['total_rows']} rows committed; "
                f"finish it with `skybatch jobs resume {self.job_id}`",
                self.job_id,
            )
        return self


def format_log_chunk(chunk: dict[str, Any], tag: bool) -> str:
    if not tag:
        return str(chunk["text"])
    prefix = f"(worker-{chunk['worker']}) "
    return "".join(prefix + line for line in str(chunk["text"]).splitlines(keepends=True))


def _writers(output: OutputWriter | Sequence[OutputWriter] | None) -> list[OutputWriter]:
    if output is None:
        return []  # results come back with job.results()
    writers = [output] if isinstance(output, OutputWriter) else list(output)
    if not writers or not all(isinstance(w, OutputWriter) for w in writers):
        raise ConfigError(
            "output must be a writer such as skybatch.JsonWriter('out.jsonl'), a non-empty "
            f"list of writers, or left out to get the results back; got {output!r}"
        )
    return writers


def _items_jsonl(items: Any) -> str:
    if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):
        raise ConfigError(f"Dataset.from_items needs a list of dicts, got {type(items).__name__}")
    lines = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(
                f"Dataset.from_items: item {i} is a {type(item).__name__}; each item must be a "
                "dict such as {'text': '...'}"
            )
        try:
            lines.append(orjson.dumps(item, option=orjson.OPT_SERIALIZE_NUMPY))
        except TypeError as e:
            raise ConfigError(
                f"Dataset.from_items: item {i} cannot be sent as JSON ({e}); use str, int, "
                "float, bool, None, lists and dicts"
            ) from None
    if not lines:
        raise ConfigError("Dataset.from_items got no items; there is nothing to map over")
    return (b"\n".join(lines) + b"\n").decode()


def _errors_writer(
    writers: list[OutputWriter], max_failed_rows: int | None, errors: OutputWriter | None
) -> OutputWriter | None:
    if max_failed_rows is None:
        if errors is not None:
            raise ConfigError(
                "errors= needs max_failed_rows=N; without it a failing batch fails the job"
            )
        return None
    if (
        isinstance(max_failed_rows, bool)
        or not isinstance(max_failed_rows, int)
        or max_failed_rows < 0
    ):
        raise ConfigError(
            f"max_failed_rows must be an integer of at least 0, got {max_failed_rows!r}"
        )
    if errors is None:
        if not writers:
            raise ConfigError(
                "max_failed_rows without output= needs errors=skybatch.JsonWriter(path) to say "
                "where the failed rows go"
            )
        root, _ = os.path.splitext(writers[0].path)
        return JsonWriter(root + ".errors.jsonl", storage_options=writers[0].storage_options)
    if not isinstance(errors, JsonWriter):
        raise ConfigError(f"errors must be a skybatch.JsonWriter, got {errors!r}")
    return errors


class Dataset:
    """A dataset to map a function over, read by an :class:`InputReader`."""

    def __init__(self, reader: InputReader) -> None:
        if not isinstance(reader, InputReader):
            raise ConfigError(
                f"Dataset needs a reader such as skybatch.JsonReader('data.jsonl'), got {reader!r}"
            )
        reader.to_spec()  # a reader of your own that cannot travel fails here, not at map()
        self.reader: InputReader | None = reader
        self._items: str | None = None

    @classmethod
    def from_items(cls, items: Sequence[dict[str, Any]]) -> Dataset:
        """A dataset of in-memory rows (a list of dicts), for "run my function over this list".

        The rows travel with the job to its staging area (beside the first output,
        or in the server's directory without one), where workers read them like a file.
        """
        ds = cls.__new__(cls)
        ds.reader = None
        ds._items = _items_jsonl(items)
        return ds

    def __repr__(self) -> str:
        if self.reader is None:
            return f"Dataset.from_items(<{(self._items or '').count(chr(10))} items>)"
        return f"Dataset({self.reader!r})"

    def map(
        self,
        mapper_fn: RemoteFunction | Any,
        pool_name: str,
        batch_size: int,
        output: OutputWriter | Sequence[OutputWriter] | None = None,
        activate_env: str | None = None,
        stream: bool = True,
        *,
        overwrite: bool = False,
        max_retries: int = defaults.MAX_RETRIES,
        retry_backoff: float = defaults.RETRY_BACKOFF,
        batch_timeout: float | None = None,
        max_failed_rows: int | None = None,
        errors: OutputWriter | None = None,
        name: str | None = None,
        resume: str | int | None = None,
        resume_from: str | int | None = None,
    ) -> Job:
        """Run ``mapper_fn`` over the dataset on pool ``pool_name``, ``batch_size`` rows at a time.

        ``max_failed_rows=N`` isolates rows that fail every retry (by splitting their batch)
        and writes them to ``errors`` (default ``<output>.errors.jsonl``) instead of failing
        the job, as long as at most N rows fail.

        ``resume="42"`` runs only the batches that job 42 did not commit (with a fixed
        mapper, say) and then publishes its complete output; the input, batch size and
        outputs must be the same. ``resume_from=`` is Sky Batch's name for it.

        With ``stream=True`` (the default) block with a progress bar until the job
        ends and raise :class:`JobFailedError` if it fails; with ``stream=False``
        return at once. Either way return the :class:`Job`, which also stands for its id.
        """
        if resume_from is not None:
            if resume is not None:
                raise ConfigError(
                    "ds.map got both resume= and resume_from=, which mean the same; give one"
                )
            resume = resume_from
        if not isinstance(mapper_fn, RemoteFunction):
            mapper_fn = remote_function(mapper_fn)
        if not isinstance(pool_name, str) or not pool_name:
            raise ConfigError(f"pool_name must be a pool's name, got {pool_name!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"max_retries must be an integer of at least 0, got {max_retries!r}")
        if retry_backoff < 0:
            raise ConfigError(f"retry_backoff must be at least 0 seconds, got {retry_backoff!r}")
        if batch_timeout is not None and (
            isinstance(batch_timeout, bool)
            or not isinstance(batch_timeout, (int, float))
            or batch_timeout <= 0
        ):
            raise ConfigError(
                f"batch_timeout must be a number of seconds above 0, got {batch_timeout!r}"
            )
        if activate_env is not None and not isinstance(activate_env, str):
            raise ConfigError(f"activate_env must be a shell command, got {activate_env!r}")
        writers = _writers(output)
        errors = _errors_writer(writers, max_failed_rows, errors)
        client = Client.connect()
        body = {
            "name": name or mapper_fn.name,
            "pool": pool_name,
            "reader": self.reader.to_spec() if self.reader is not None else {"kind": "items"},
            "items": self._items,
            "writers": [w.to_spec() for w in writers],
            "mapper": mapper_fn.to_spec(),
            "batch_size": batch_size,
            "activate_env": activate_env,
            "overwrite": overwrite,
            "max_retries": max_retries,
            "retry_backoff": retry_backoff,
            "batch_timeout": batch_timeout,
            "max_failed_rows": max_failed_rows,
            "errors": errors.to_spec() if errors is not None else None,
        }
        view = client.resume(str(resume), body) if resume is not None else client.submit(body)
        job = Job(view["id"], client)
        if stream:
            try:
                job.wait(progress=True)
            except KeyboardInterrupt:
                print(
                    f"\njob {job.job_id} keeps running on the pool; follow it with "
                    f"`skybatch jobs queue`, stop it with `skybatch jobs cancel {job.job_id}`",
                    file=sys.stderr,
                )
                raise
        return job

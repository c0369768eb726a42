"""The two interfaces every format implements: :class:`InputReader` and :class:`OutputWriter`.

A reader answers three questions: where it reads (``validate``), how the input
splits into batches (``plan``, streamed on the server), and what one batch's
bytes are (``read``, on the agent, a ranged read). A writer stores one batch's
part (``write_part``, on the agent), merges the committed parts into the final
output (``reduce``, on the server) and removes its staging area (``cleanup``).

Readers and writers travel from the user's process to the server and the
agents as specs: ``{"kind": ..., **fields}`` (``registry.py`` turns them back).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, Any, ClassVar, cast

from skybatch.batches import BatchPlan, Part
from skybatch.errors import ConfigError, InputError, OutputError, SkyBatchError
from skybatch.io import storage
from skybatch.runner import codec

__all__ = [
    "InputReader",
    "OutputWriter",
    "PartialReduce",
    "content_stamp",
    "set_partial_reduce",
]


#: Keys of fsspec's ``info`` that change when an object's content does, best first.
_STAMPS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "created")


def content_stamp(info: dict[str, Any]) -> list[Any]:
    """``[size, ETag or mtime]`` from an fsspec ``info`` dict: what a resume compares."""
    stamp = next((info[k] for k in _STAMPS if info.get(k)), "")
    return [info.get("size"), str(stamp)]


#: ``(job id, writer spec) -> {"rows", "missing"}``: asks the server for a partial reduce.
PartialReduce = Callable[[str, dict[str, Any]], dict[str, Any]]
#: Set by ``skybatch/__init__`` to the client's: io sits below the client and must not import it.
_partial_reduce: PartialReduce | None = None


def set_partial_reduce(reduce: PartialReduce) -> None:
    """Route :meth:`OutputWriter.reduce_results` through ``reduce`` (the client's)."""
    global _partial_reduce
    _partial_reduce = reduce


@dataclass(eq=False, repr=False)
class _ReaderFields:
    """Sky Batch's reader base is a dataclass with a ``path`` field: ``@dataclass``
    subclasses inherit it. Keyword-only with a default, so that a subclass's own fields
    need no defaults and ``RangeReader(count=20)`` works beside ``RangeReader(path="",
    count=20)``. An empty path travels as None (no path): the server refuses a relative
    local path, and "" is Sky Batch's way of saying there is none."""

    # A factory, not a plain default: a plain one would sit on the class as ``path =
    # None``, and a subclass that declares its own ``path: str`` (as Sky Batch's examples
    # do) would inherit it as a default, so its next field "follows a default argument".
    path: str | None = field(default_factory=lambda: None, kw_only=True)


@dataclass(eq=False, repr=False)
class _WriterFields:
    """Sky Batch's writer base is a dataclass whose first field is ``path``:
    ``TextWriter("out/", column="text")``. Only this field: the annotations of
    :class:`OutputWriter` itself are no dataclass fields, as it is not decorated."""

    path: str


class InputReader(_ReaderFields):
    """Base class of input formats.

    A reader of your own needs only two methods, as in Sky Batch::

        @dataclass
        class RangeReader(skybatch.InputReader):
            count: int

            def __len__(self) -> int:                      # how many rows
                return self.count

            def download_batch(self, start_idx, end_idx, cache_dir):
                # rows start_idx..end_idx (inclusive), on a worker
                return [{"index": i} for i in range(start_idx, end_idx + 1)]

    ``__len__`` runs on the server to plan batches of ``batch_size`` rows;
    ``download_batch`` runs on a worker (in its agent, ahead of the mapper) and
    returns that batch's rows as dicts. ``cache_dir`` is a directory on the
    worker for files it downloads. The class travels like a mapper: from an
    importable module by name, from your script as source (with its module's
    imports); its attributes must be JSON values.

    Built-in formats implement the lower-level methods instead (``plan``,
    ``read``, ``split``: byte ranges planned while streaming the input).
    """

    #: The spec's ``kind``, by which ``registry.py`` finds the class.
    kind: ClassVar[str] = ""
    #: The codec tag (``runner/codec.py``) by which the runner decodes what ``read``
    #: returns; by default a pickle of the row dicts.
    payload_format: ClassVar[str] = codec.RECORDS
    #: Where :meth:`plan` may store data workers read (a compressed input's
    #: plain lines); chosen by the server at submit, beside the first output.
    scratch: str | None = None

    # -- the Sky Batch interface -------------------------------------------------------

    def __len__(self) -> int:
        raise NotImplementedError

    def __bool__(self) -> bool:
        # A reader is always a reader, whatever its length (or lack of one).
        return True

    def download_batch(self, start_idx: int, end_idx: int, cache_dir: str) -> list[dict[str, Any]]:
        """Rows ``start_idx`` to ``end_idx`` *inclusive*, as a list of dicts."""
        raise NotImplementedError

    def _by_index(self) -> bool:
        return type(self).download_batch is not InputReader.download_batch

    def _rows(self) -> int:
        try:
            n = len(self)
        except NotImplementedError:
            raise ConfigError(
                f"{type(self).__name__} must implement __len__ (how many rows) and "
                "download_batch(start_idx, end_idx, cache_dir), or plan/read/split"
            ) from None
        except Exception as e:
            raise InputError(f"{self.describe()}: len() failed: {type(e).__name__}: {e}") from e
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InputError(f"{self.describe()}: len() must be a count of rows, got {n!r}")
        return n

    # -- what the server and agents call ---------------------------------------------

    def to_spec(self) -> dict[str, Any]:
        from skybatch.io.custom import custom_spec

        spec = custom_spec(self, "reader")
        if spec["state"].get("path") == "":
            del spec["state"]["path"]
        return spec

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> InputReader:
        raise NotImplementedError

    def describe(self) -> str:
        """A short name for messages (usually the path)."""
        return repr(self)

    def validate(self) -> None:
        """Raise :class:`~skybatch.errors.InputError` unless the input is readable."""
        if not self._by_index():
            raise ConfigError(
                f"{type(self).__name__} must implement download_batch(start_idx, end_idx, "
                "cache_dir) and __len__, or plan/read/split"
            )
        self._rows()

    def files(self) -> list[str]:
        return []

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input's content (sizes, mtimes or ETags): a resume
        refuses an input that changed, since its batches would no longer line up."""
        if self._by_index():
            return {"rows": self._rows()}
        out: dict[str, Any] = {}
        for url in self.files():
            fs, path = storage.filesystem(url, getattr(self, "storage_options", None))
            out[url] = content_stamp(fs.info(path))
        return out

    def uses_scratch(self) -> bool:
        """Whether :meth:`plan` stores data in ``self.scratch`` (set by the server)."""
        return False

    def cleanup(self) -> None:
        """Remove what :meth:`plan` stored in the scratch area."""

    def plan(self, batch_size: int) -> Iterator[BatchPlan]:
        """Yield the batches in order, streaming the input with bounded memory."""
        total = self._rows()
        for index, start in enumerate(range(0, total, batch_size)):
            count = min(batch_size, total - start)
            yield BatchPlan(index, 0, start, start + count, start, count, start + 1)

    def read(self, batch: BatchPlan) -> bytes:
        """The payload of one batch, read from storage with a ranged read."""
        cache = os.path.abspath(os.path.join(".skybatch", "cache"))
        os.makedirs(cache, exist_ok=True)
        label = f"{type(self).__name__}.download_batch({batch.start}, {batch.end - 1})"
        try:
            rows = self.download_batch(batch.start, batch.end - 1, cache)
        except Exception as e:
            raise InputError(f"{label} failed: {type(e).__name__}: {e}") from e
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise InputError(f"{label} must return a list of dicts, got {type(rows).__name__}")
        if len(rows) != batch.row_count:
            raise InputError(
                f"{label} returned {len(rows)} rows for {batch.row_count}; end_idx is inclusive"
            )
        return pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)

    def split(self, batch: BatchPlan) -> list[BatchPlan]:
        """Two halves of a batch (to isolate failing rows); indices are set by the caller."""
        half = batch.row_count // 2
        return batch.halved(batch.start + half, half, batch.line + half)

    def source_url(self, batch: BatchPlan) -> str | None:
        """Where :meth:`read` reads ``batch`` from; None when the reader fetches its rows
        itself (a reader of your own), which a relay cannot stand in for."""
        return None

    def payload_range(self, batch: BatchPlan) -> tuple[bytes, str, int, int] | None:
        """``(prefix, url, start, end)`` when ``read(batch)`` is ``prefix`` followed by
        bytes ``[start, end)`` of ``url``: the server's relay then streams the batch
        instead of holding it. None when the payload is computed (Parquet rows)."""
        return None


class OutputWriter(_WriterFields):
    """Base class of output formats. Subclasses set ``kind`` and implement the methods.

    A writer produces one *part* per committed batch (``write_part``, on the
    agent) and turns the parts into the final output at the end (``stage``,
    on the server, then ``publish`` once every output of the job has staged).

    A writer of your own implements either ``write_batch`` (and may override
    ``reduce``), or Sky Batch's protocol: ``upload_batch(results, start_idx,
    end_idx, job_id)``, ``reduce_results(job_id)`` and ``cleanup(job_id)``.
    Such a writer's batches are stored as parts like any other's; when the job
    has succeeded, the server hands each *committed* batch to ``upload_batch``
    once, in row order, then calls ``reduce_results`` once. So a retried batch,
    or an attempt whose commit was refused, never reaches ``upload_batch``, and
    a per-item file is written exactly once per row. Its ``job_id`` is
    ``<deployment>-<job>`` (unique across deployments sharing a bucket), and
    calling ``reduce_results``/``cleanup`` yourself with the job's id does what
    it does for a built-in writer (the server replays the committed batches).
    """

    kind: ClassVar[str] = ""
    #: The codec tag (``runner/codec.py``) by which the runner formats a part; by
    #: default a pickle of plain rows, handed to :meth:`write_batch` by the agent.
    part_format: ClassVar[str] = codec.RECORDS
    #: File extension of stored parts.
    part_ext: ClassVar[str] = "part"

    columns: list[str] | None = None
    storage_options: dict[str, Any] | None = None
    #: The id of the deployment that runs the job (the stored spec's ``_staging``,
    #: set at submit): deployments sharing an output directory, whose job ids
    #: collide, get staging areas of their own. None in the user's process (the
    #: id is read from its SKYBATCH_HOME); "" for jobs submitted before ids.
    _staging: str | None = None

    # -- the interface of a writer of your own ------------------------------------------

    def write_batch(self, rows: list[dict[str, Any]]) -> bytes:
        """One batch's part: the bytes of these rows in this format (on a worker)."""
        raise NotImplementedError

    def reduce(self, parts: Iterator[IO[bytes]], out: IO[bytes]) -> None:
        """Write the final output to ``out`` from the parts, in input order (on the
        server). The default concatenates them."""
        for part in parts:
            shutil.copyfileobj(part, out, 1024 * 1024)

    def _by_batch(self) -> bool:
        return type(self).write_batch is not OutputWriter.write_batch

    # -- Sky Batch's writer protocol -------------------------------------------------

    def upload_batch(
        self, results: list[dict[str, Any]], start_idx: int, end_idx: int, job_id: str
    ) -> str | None:
        """Store the results of rows ``start_idx`` to ``end_idx`` *inclusive* (Sky Batch's
        protocol; see the class docstring for when skybatch calls it)."""
        raise NotImplementedError

    def _by_upload(self) -> bool:
        return type(self).upload_batch is not OutputWriter.upload_batch

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.upload_batch is OutputWriter.upload_batch:
            return
        # The names collide: the server calls cleanup(job id) to remove the staging area,
        # and reduce_results(job id) is skybatch's partial reduce. Keep the user's methods
        # for the server's replay, and give both names skybatch's meaning plus theirs.
        own_reduce = cls.__dict__.get("reduce_results")
        if own_reduce is not None and not hasattr(own_reduce, "_skybatch_user"):
            cls._sky_reduce = own_reduce  # type: ignore[attr-defined]

            @functools.wraps(own_reduce)
            def reduce_results(self: OutputWriter, job_id: int | str) -> dict[str, Any]:
                return OutputWriter.reduce_results(self, job_id)

            reduce_results._skybatch_user = own_reduce  # type: ignore[attr-defined]
            cls.reduce_results = reduce_results  # type: ignore[method-assign]
        own_cleanup = cls.__dict__.get("cleanup")
        if own_cleanup is not None and not hasattr(own_cleanup, "_skybatch_user"):

            @functools.wraps(own_cleanup)
            def cleanup(self: OutputWriter, job_id: int | str) -> None:
                try:
                    own_cleanup(self, self.staging_name(job_id))
                finally:
                    OutputWriter.cleanup(self, job_id)

            cleanup._skybatch_user = own_cleanup  # type: ignore[attr-defined]
            cls.cleanup = cleanup  # type: ignore[method-assign]

    # -- what the server and agents call ---------------------------------------------

    def to_spec(self) -> dict[str, Any]:
        from skybatch.io.custom import custom_spec

        if not isinstance(getattr(self, "path", None), str):
            raise ConfigError(
                f"{type(self).__name__} needs a `path` attribute: where the output goes"
            )
        if not self._by_batch() and not self._by_upload():
            raise ConfigError(
                f"{type(self).__name__} must implement write_batch(rows) -> bytes (and may "
                "override reduce(parts, out)), or Sky Batch's upload_batch(results, "
                "start_idx, end_idx, job_id)"
            )
        # Like every writer spec, it names its path (for clashes, resume, reduce_results).
        return {**custom_spec(self, "writer"), "path": self.path}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> OutputWriter:
        raise NotImplementedError

    def describe(self) -> str:
        return self.path

    def runner_spec(self) -> dict[str, Any]:
        """What the runner needs to format this writer's part of a batch."""
        if self._by_upload():
            # upload_batch gets whole results, as in Sky Batch: its `column` is its own.
            return {"format": self.part_format, "columns": None}
        columns = self.columns
        if columns is None and isinstance(getattr(self, "column", None), (str, list)):
            columns = [self.column] if isinstance(self.column, str) else self.column  # type: ignore[attr-defined]
        return {"format": self.part_format, "columns": columns}

    # -- staging -------------------------------------------------------------------

    def staging_name(self, job_id: int | str) -> str:
        """``<deployment>-<job>``: unique among the deployments writing beside this output."""
        deployment = self._staging
        if deployment is None:
            from skybatch.config import home

            where = home()
            deployment = where.read_deployment_id()
            if deployment is None:
                raise ConfigError(
                    f"SKYBATCH_HOME {where.root} has never run a server, so it ran no job "
                    f"{job_id}; set SKYBATCH_HOME to the deployment that ran it"
                )
        return f"{deployment}-{job_id}" if deployment else str(job_id)

    def _located(self) -> str:
        # A Sky Batch writer's directory ("out/texts/") stages beside it, not inside it.
        return (self.path.rstrip("/") or self.path) if self._by_upload() else self.path

    def staging_root(self, job_id: int | str) -> str:
        """``<output dir>/.skybatch/<deployment>-<job>``: the job's staging area beside
        this output."""
        where = storage.dirname(self._located())
        return storage.join(where, ".skybatch", self.staging_name(job_id))

    def staging_dir(self, job_id: int | str) -> str:
        """``<output dir>/.skybatch/<job>/<output name>``: parts live beside the output."""
        return storage.join(self.staging_root(job_id), storage.basename(self._located()))

    def part_path(self, job_id: int | str, batch: int, attempt: int) -> str:
        # Attempt ids in the name fence zombies: a late writer never overwrites a
        # committed part, and the reduce reads only the committed attempt's file.
        return storage.join(self.staging_dir(job_id), f"{batch:08d}.{attempt}.{self.part_ext}")

    def prepare(self, job_id: int, overwrite: bool) -> None:
        """At submit, on the server: fail now if the output cannot be produced."""
        if self._by_upload() and self._is_directory():
            self.prepare_directory(job_id, overwrite)
        else:
            self.prepare_file(job_id, overwrite, "out")

    def output_exists(self) -> bool:
        """Whether a final output is already there (publishing over it needs overwrite)."""
        if self._by_upload() and self._is_directory():
            return self.directory_has_files()
        return storage.exists(self.path, self.storage_options)

    def _is_directory(self) -> bool:
        """A Sky Batch writer's output is a directory of files when its path ends in
        ``/`` (per-item files) or names a directory; else one file."""
        if self.path.endswith("/"):
            return True
        fs, path = storage.filesystem(self.path, self.storage_options)
        with storage.translate_errors(self.path, "check output", OutputError):
            return bool(fs.isdir(path))

    #: Whether a part is one file at :meth:`part_path` (what :meth:`encode_part` returns);
    #: a writer whose part is a directory of files (images) sets False, and the relay
    #: hands its encoded part to :meth:`write_part` on the server.
    part_is_file: ClassVar[bool] = True

    def encode_part(self, batch: int, data: bytes) -> bytes:
        """A part's stored bytes from the runner's ``data`` (on the worker: a writer of
        your own's ``write_batch`` runs here)."""
        if self._by_batch():
            rows = pickle.loads(data)  # plain values from this job's runner
            data = self.write_batch(rows)
            if not isinstance(data, (bytes, bytearray)):
                raise OutputError(
                    f"{type(self).__name__}.write_batch must return bytes, got "
                    f"{type(data).__name__}"
                )
        return data

    def write_part(self, job_id: int, batch: int, attempt: int, data: bytes) -> int | None:
        """Write a batch's part; the bytes written when the part is one file (else None).

        Not synced: a part is read back within the job, mostly from the page cache, and
        syncing each one cost more than the mapper on short batches (and made removing
        them slow). A part lost to a machine crash is found by the reduce, which checks
        the sizes recorded at commit, and its batch runs again.
        """
        encoded = self.encode_part(batch, data)
        storage.write_bytes(self.part_path(job_id, batch, attempt), encoded, self.storage_options)
        return len(encoded)

    def discard_part(self, job_id: int, batch: int, attempt: int) -> None:
        storage.remove_file(self.part_path(job_id, batch, attempt), self.storage_options)

    # -- segments: the parts of a lease's batches in one file ---------------------------

    def segments(self) -> bool:
        """Whether agents may write this output's parts of several batches into one file
        (a segment), each a byte range of it: for outputs whose reduce concatenates
        parts. Creating a file costs more than the mapper on short batches."""
        return False

    def segment_path(self, job_id: int | str, segment: int) -> str:
        """The segment file named after the first attempt whose part it holds."""
        return storage.join(self.staging_dir(job_id), f"segment.{segment}.{self.part_ext}")

    def write_segment(self, job_id: int, segment: int, parts: list[bytes]) -> list[list[int]]:
        """Write these parts, one after the other, as one segment; each one's place."""
        places, offset = [], 0
        for data in parts:
            places.append([segment, offset, len(data)])
            offset += len(data)
        storage.write_bytes(
            self.segment_path(job_id, segment), b"".join(parts), self.storage_options
        )
        return places

    def discard_segment(self, job_id: int, segment: int) -> None:
        storage.remove_file(self.segment_path(job_id, segment), self.storage_options)

    @contextlib.contextmanager
    def open_part(self, job_id: int | str, part: Part) -> Iterator[IO[bytes]]:
        """A committed part's bytes to read: its own file, or its range of a segment."""
        place = part.place
        if not isinstance(place, list):
            url = self.part_path(job_id, part.batch, part.attempt)
            with (
                storage.translate_errors(url, "read part", OutputError),
                storage.open_stream(url, self.storage_options) as f,
            ):
                yield f
            return
        segment, offset, size = place
        url = self.segment_path(job_id, segment)
        with storage.translate_errors(url, "read part", OutputError):
            # Streamed in either case: a range may be a lease's many parts (coalesced),
            # which the reduce must not hold in memory at once.
            opened = (
                open(url, "rb")  # noqa: SIM115 (closed by the with below)
                if storage.is_local(url)
                else storage.open_stream(url, self.storage_options)
            )
            with opened as f:
                f.seek(offset)
                yield cast(IO[bytes], _Range(f, size, url))

    def part_lost(self, job_id: int | str, part: Part) -> bool:
        """Whether a committed local part is gone or cut short (see ``write_part``)."""
        place = part.place
        if place is None:
            return False
        if isinstance(place, list):
            segment, offset, size = place
            path, least = self.segment_path(job_id, segment), offset + size
        else:
            path, least = self.part_path(job_id, part.batch, part.attempt), place
        try:
            found = os.stat(path).st_size
        except OSError:
            return True
        return found < least if isinstance(place, list) else found != least

    def stage(self, job_id: int | str, parts: Sequence[Part]) -> storage.Staged:
        """Merge the parts, in order, into a staged final output (not yet visible)."""
        if self._by_upload():
            return _Replay(self, job_id, parts)
        urls = [self.part_path(job_id, p.batch, p.attempt) for p in parts]

        def streams() -> Iterator[IO[bytes]]:
            for url in urls:
                with (
                    storage.translate_errors(url, "read part", OutputError),
                    storage.open_stream(url, self.storage_options) as f,
                ):
                    yield f

        staged = self.staged_file(job_id)
        try:
            with staged.open() as out:
                self.reduce(streams(), out)
        except SkyBatchError:
            staged.discard()
            raise
        except Exception as e:
            staged.discard()
            raise OutputError(
                f"{type(self).__name__}.reduce failed: {type(e).__name__}: {e}"
            ) from e
        return staged

    def staged_file(self, job_id: int | str) -> storage.StagedFile:
        """This output's staged file, named after the job: a reduce restarted after a
        crash overwrites (or its discard removes) what its predecessor left."""
        return storage.StagedFile(self.path, self.storage_options, self.staging_name(job_id))

    def cleanup(self, job_id: int | str) -> None:
        """Remove the job's staging area (its parts). The final output stays."""
        area = storage.join(storage.dirname(self._located()), ".skybatch")
        storage.remove_tree(self.staging_root(job_id), self.storage_options)
        if storage.is_local(area):
            with contextlib.suppress(OSError):
                os.rmdir(area)  # only if no other job stages beside this output

    def reduce_results(self, job_id: int | str) -> dict[str, Any]:
        """Write what a failed or cancelled job committed, in order, to this output.

        Returns ``{"rows": n, "missing": [[first, last], ...]}``: the row ranges
        (inclusive) that did not commit and are absent from the output.
        """
        if _partial_reduce is None:
            raise SkyBatchError("reduce_results needs the skybatch client: import skybatch")
        return _partial_reduce(str(job_id), self.to_spec())

    # -- helpers for subclasses ------------------------------------------------------

    def prepare_file(self, job_id: int, overwrite: bool, example: str) -> None:
        """``prepare`` of a writer whose output is one file."""
        fs, path = storage.filesystem(self.path, self.storage_options)
        with storage.translate_errors(self.path, "check output", OutputError):
            if fs.isdir(path):
                raise OutputError(
                    f"output {self.path} is a directory; name a file such as {example}"
                )
            if not overwrite and fs.exists(path):
                raise OutputError(
                    f"output {self.path} already exists; pass overwrite=True to ds.map() "
                    "to replace it, or choose another path"
                )
        storage.check_writable(self.path, self.storage_options)
        storage.make_staging_root(self.staging_root(job_id), self.storage_options)
        storage.makedirs(self.staging_dir(job_id), self.storage_options)

    def prepare_directory(self, job_id: int, overwrite: bool) -> None:
        """``prepare`` of a writer whose output is a directory of files."""
        fs, path = storage.filesystem(self.path, self.storage_options)
        with storage.translate_errors(self.path, "check output", OutputError):
            if fs.isfile(path):
                raise OutputError(
                    f"output {self.path} is a file; this writer writes a directory of files"
                )
        if not overwrite and self.output_exists():
            raise OutputError(
                f"output directory {self.path} already has files; pass overwrite=True to "
                "ds.map() to replace them, or choose another path"
            )
        storage.check_writable(storage.join(self.path, "x"), self.storage_options)
        storage.make_staging_root(self.staging_root(job_id), self.storage_options)
        storage.makedirs(self.staging_dir(job_id), self.storage_options)

    def directory_has_files(self) -> bool:
        fs, path = storage.filesystem(self.path, self.storage_options)
        with storage.translate_errors(self.path, "check output", OutputError):
            if not fs.isdir(path):
                return False
            found = fs.find(path, detail=True)
        # Directory entries do not count (some stores keep one after the last file goes).
        return any(info.get("type") != "directory" for info in found.values())

    def stage_concatenated(
        self, job_id: int | str, parts: Sequence[Part], skip_first_line: bool = False
    ) -> storage.StagedFile:
        """The parts one after the other, streamed into one staged file.

        ``skip_first_line``: every part starts with the same header line (CSV);
        keep the first part's and check the others match it.
        """
        staged = self.staged_file(job_id)
        header: bytes | None = None
        if not skip_first_line:
            parts = _coalesced(parts)
        try:
            with staged.open() as out:
                for part in parts:
                    with self.open_part(job_id, part) as src:
                        if skip_first_line:
                            line = src.readline()
                            if header is None:
                                header = line
                                out.write(line)
                            elif line != header:
                                raise OutputError(
                                    f"{self.path}: rows {part.row_start}-"
                                    f"{part.row_start + part.row_count - 1} have columns "
                                    f"{line.decode().strip()!r}, the rows before them "
                                    f"{header.decode().strip()!r}; give every result the same "
                                    "keys, or select them with column=[...]"
                                )
                        shutil.copyfileobj(src, out, 1024 * 1024)
        except BaseException:
            staged.discard()
            raise
        return staged

    def stage_shards(self, job_id: int | str, parts: Sequence[Part]) -> storage.StagedMoves:
        """The parts as the final output: ``<path>/part-00000.<ext>``, ... in row order."""
        moves = [
            (
                self.part_path(job_id, part.batch, part.attempt),
                storage.join(self.path, f"part-{n:05d}.{self.part_ext}"),
            )
            for n, part in enumerate(parts)
        ]
        return storage.StagedMoves(self.path, moves, self.storage_options)


def _coalesced(parts: Sequence[Part]) -> list[Part]:
    """Parts that follow each other in one segment as one range (a lease's batches are
    consecutive, so a million-row job's thousand parts are read as a few ranges)."""
    out: list[Part] = []
    for part in parts:
        last = out[-1] if out else None
        if (
            last is not None
            and isinstance(last.place, list)
            and isinstance(part.place, list)
            and part.place[0] == last.place[0]
            and part.place[1] == last.place[1] + last.place[2]
        ):
            segment, offset, size = last.place
            out[-1] = replace(last, place=[segment, offset, size + part.place[2]])
        else:
            out.append(part)
    return out


class _Range:
    """The next ``size`` bytes of an open file, read as a file of their own; a file
    that ends before them is an error, never a part cut short in an output."""

    def __init__(self, f: IO[bytes], size: int, url: str) -> None:
        self._f = f
        self._left = size
        self._url = url

    def _took(self, data: bytes, wanted: int) -> bytes:
        if wanted and not data:
            raise OutputError(
                f"part {self._url} ends {self._left} bytes short of what its agent wrote "
                "(lost in a machine crash?); resume the job to run its batches again"
            )
        self._left -= len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        return self._took(self._f.read(n), n)

    def readline(self, limit: int = -1) -> bytes:
        # By blocks and a seek back: fsspec's files take no readline limit.
        limit = self._left if limit < 0 else min(limit, self._left)
        out = bytearray()
        while len(out) < limit:
            block = self._took(self._f.read(min(65536, limit - len(out))), 1)
            end = block.find(b"\n") + 1
            if end:
                self._f.seek(end - len(block), 1)
                self._left += len(block) - end
                out += block[:end]
                break
            out += block
        return bytes(out)


class _Replay:
    """The "publish" of a Sky Batch writer: its committed batches, in row order, through
    ``upload_batch``, then its own ``reduce_results``. It runs after every output of the
    job has staged; what the writer uploads is visible as it goes (as in Sky Batch).

    Each batch ``upload_batch`` accepts leaves a marker in the job's staging area, so a
    replay cut short (an upload that raised, a server restart) continues after the
    batches already uploaded when the job resumes: an appending writer gets every row
    once. The markers go with the staging area when the job succeeds."""

    def __init__(self, writer: OutputWriter, job_id: int | str, parts: Sequence[Part]) -> None:
        self.writer = writer
        self.job_id = job_id
        self.parts = list(parts)

    def publish(self) -> None:
        w = self.writer
        name = type(w).__name__
        token = w.staging_name(self.job_id)
        for part in self.parts:
            # Named by rows, not batch: a committed part keeps its rows across resumes.
            marker = storage.join(
                w.staging_dir(self.job_id), f"uploaded.{part.row_start}.{part.row_count}"
            )
            if storage.exists(marker, w.storage_options):
                continue
            url = w.part_path(self.job_id, part.batch, part.attempt)
            with (
                storage.translate_errors(url, "read part", OutputError),
                storage.open_stream(url, w.storage_options) as f,
            ):
                rows = pickle.load(f)  # plain values from this job's runner
            first, last = part.row_start, part.row_start + part.row_count - 1
            label = f"{name}.upload_batch(rows {first}-{last})"
            _call(label, w.upload_batch, rows, first, last, token)
            storage.write_bytes(marker, b"", w.storage_options, sync=True)
        reduce = getattr(type(w), "_sky_reduce", None)
        if reduce is not None:
            _call(f"{name}.reduce_results", reduce, w, token)

    def discard(self) -> None:
        """Nothing is written before :meth:`publish`."""


def _call(label: str, fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except SkyBatchError:
        raise
    except Exception as e:
        raise OutputError(f"{label} failed: {type(e).__name__}: {e}") from e

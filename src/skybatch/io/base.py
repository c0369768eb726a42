"""The two interfaces every format implements: :class:`InputReader` and :class:`OutputWriter`.

A reader answers three questions: where it reads (``validate``), how the input
splits into batches (``plan``, streamed on the server), and what one batch's
bytes are (``read``, on the agent, a ranged read). A writer stores one batch's
part (``write_part``, on the agent), merges the committed parts into the final
output (``reduce``, on the server) and removes its staging area (``cleanup``).

Readers and writers travel from the user's process to the server and the
agents as specs: ``{"kind": ..., **fields}``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from skybatch.errors import OutputError
from skybatch.io import storage

__all__ = [
    "BatchPlan",
    "InputReader",
    "OutputWriter",
    "Part",
    "reader_from_spec",
    "writer_from_spec",
]


@dataclass(frozen=True)
class BatchPlan:
    """One batch as a descriptor: where its rows are, not the rows themselves."""

    index: int
    file: int  # index into the reader's file list
    start: int  # first byte
    end: int  # one past the last byte
    row_start: int  # global index of the batch's first row
    row_count: int
    line: int  # 1-based line of the first row in its file, for error messages


@dataclass(frozen=True)
class Part:
    """A committed batch's part: which attempt wrote it, and which rows it holds."""

    batch: int
    attempt: int
    row_start: int
    row_count: int


_READERS: dict[str, type[InputReader]] = {}
#: Keys of fsspec's ``info`` that change when an object's content does, best first.
_STAMPS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "created")


def content_stamp(info: dict[str, Any]) -> list[Any]:
    """``[size, ETag or mtime]`` from an fsspec ``info`` dict: what a resume compares."""
    stamp = next((info[k] for k in _STAMPS if info.get(k)), "")
    return [info.get("size"), str(stamp)]


_WRITERS: dict[str, type[OutputWriter]] = {}


class InputReader:
    """Base class of input formats. Subclasses set ``kind`` and implement the methods."""

    kind: ClassVar[str] = ""
    #: How the runner decodes what ``read`` returns.
    payload_format: ClassVar[str] = "jsonl"
    #: Where :meth:`plan` may store data workers read (a compressed input's
    #: plain lines); chosen by the server at submit, beside the first output.
    scratch: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _READERS[cls.kind] = cls

    def to_spec(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> InputReader:
        raise NotImplementedError

    def describe(self) -> str:
        """A short name for messages (usually the path)."""
        raise NotImplementedError

    def validate(self) -> None:
        """Raise :class:`~skybatch.errors.InputError` unless the input is readable."""
        raise NotImplementedError

    def files(self) -> list[str]:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input's content (sizes, mtimes or ETags): a resume
        refuses an input that changed, since its batches would no longer line up."""
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
        raise NotImplementedError

    def read(self, batch: BatchPlan) -> bytes:
        """The payload of one batch, read from storage with a ranged read."""
        raise NotImplementedError

    def split(self, batch: BatchPlan) -> list[BatchPlan]:
        """Two halves of a batch (to isolate failing rows); indices are set by the caller."""
        raise NotImplementedError


class OutputWriter:
    """Base class of output formats. Subclasses set ``kind`` and implement the methods.

    A writer produces one *part* per committed batch (``write_part``, on the
    agent) and turns the parts into the final output at the end (``stage``,
    on the server, then ``publish`` once every output of the job has staged).
    """

    kind: ClassVar[str] = ""
    #: How the runner formats a part: "jsonl", "csv", "records" (a pickle of
    #: plain rows, converted by the agent) or "image".
    part_format: ClassVar[str] = "jsonl"
    #: File extension of stored parts.
    part_ext: ClassVar[str] = "jsonl"

    path: str
    columns: list[str] | None
    storage_options: dict[str, Any] | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _WRITERS[cls.kind] = cls

    def to_spec(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> OutputWriter:
        raise NotImplementedError

    def describe(self) -> str:
        return self.path

    def runner_spec(self) -> dict[str, Any]:
        """What the runner needs to format this writer's part of a batch."""
        return {"format": self.part_format, "columns": self.columns}

    # -- staging -------------------------------------------------------------------

    def staging_root(self, job_id: int | str) -> str:
        """``<output dir>/.skybatch/<job>``: the job's staging area beside this output."""
        return storage.join(storage.dirname(self.path), ".skybatch", str(job_id))

    def staging_dir(self, job_id: int | str) -> str:
        """``<output dir>/.skybatch/<job>/<output name>``: parts live beside the output."""
        return storage.join(self.staging_root(job_id), storage.basename(self.path))

    def part_path(self, job_id: int | str, batch: int, attempt: int) -> str:
        # Attempt ids in the name fence zombies: a late writer never overwrites a
        # committed part, and the reduce reads only the committed attempt's file.
        return storage.join(self.staging_dir(job_id), f"{batch:08d}.{attempt}.{self.part_ext}")

    def prepare(self, job_id: int, overwrite: bool) -> None:
        """At submit, on the server: fail now if the output cannot be produced."""
        raise NotImplementedError

    def output_exists(self) -> bool:
        """Whether a final output is already there (publishing over it needs overwrite)."""
        return storage.exists(self.path, self.storage_options)

    def write_part(self, job_id: int, batch: int, attempt: int, data: bytes) -> None:
        storage.write_bytes(self.part_path(job_id, batch, attempt), data, self.storage_options)

    def discard_part(self, job_id: int, batch: int, attempt: int) -> None:
        storage.remove_file(self.part_path(job_id, batch, attempt), self.storage_options)

    def stage(self, job_id: int | str, parts: Sequence[Part]) -> storage.Staged:
        """Merge the parts, in order, into a staged final output (not yet visible)."""
        raise NotImplementedError

    def cleanup(self, job_id: int | str) -> None:
        """Remove the job's staging area (its parts). The final output stays."""
        area = storage.join(storage.dirname(self.path), ".skybatch")
        storage.remove_tree(self.staging_root(job_id), self.storage_options)
        if storage.is_local(area):
            with contextlib.suppress(OSError):
                os.rmdir(area)  # only if no other job stages beside this output

    def reduce_results(self, job_id: int | str) -> dict[str, Any]:
        """Write what a failed or cancelled job committed, in order, to this output.

        Returns ``{"rows": n, "missing": [[first, last], ...]}``: the row ranges
        (inclusive) that did not commit and are absent from the output.
        """
        from skybatch.client.api import Client

        return Client.connect().reduce(str(job_id), self.to_spec())

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
        storage.makedirs(self.staging_dir(job_id), self.storage_options)

    def directory_has_files(self) -> bool:
        fs, path = storage.filesystem(self.path, self.storage_options)
        with storage.translate_errors(self.path, "check output", OutputError):
            if not fs.isdir(path):
                return False
            return bool(fs.find(path, maxdepth=None, withdirs=False))

    def stage_concatenated(
        self, job_id: int | str, parts: Sequence[Part], skip_first_line: bool = False
    ) -> storage.StagedFile:
        """The parts one after the other, streamed into one staged file.

        ``skip_first_line``: every part starts with the same header line (CSV);
        keep the first part's and check the others match it.
        """
        staged = storage.StagedFile(self.path, self.storage_options)
        header: bytes | None = None
        try:
            with staged.open() as out:
                for part in parts:
                    url = self.part_path(job_id, part.batch, part.attempt)
                    with (
                        storage.translate_errors(url, "read part", OutputError),
                        storage.open_stream(url, self.storage_options) as src,
                    ):
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


#: Formats whose module is imported on first use (pyarrow takes a while to import).
_LAZY = {"parquet": "skybatch.io.parquetio"}


def _load_kind(kind: str) -> None:
    module = _LAZY.get(kind)
    if module is not None:
        importlib.import_module(module)


def reader_from_spec(spec: dict[str, Any]) -> InputReader:
    kind = spec.get("kind", "")
    if kind not in _READERS:
        _load_kind(kind)
    cls = _READERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown reader kind {kind!r}; known: {', '.join(sorted(_READERS))}")
    return cls.from_spec(spec)


def writer_from_spec(spec: dict[str, Any]) -> OutputWriter:
    kind = spec.get("kind", "")
    if kind not in _WRITERS:
        _load_kind(kind)
    cls = _WRITERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown writer kind {kind!r}; known: {', '.join(sorted(_WRITERS))}")
    return cls.from_spec(spec)

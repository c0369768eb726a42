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
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

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
    """Base class of output formats. Subclasses set ``kind`` and implement the methods."""

    kind: ClassVar[str] = ""
    #: File extension of parts and how the runner formats them.
    part_format: ClassVar[str] = "jsonl"

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

    def staging_dir(self, job_id: int) -> str:
        """``<output dir>/.skybatch/<job>/<output name>``: parts live beside the output."""
        return storage.join(self.staging_root(job_id), storage.basename(self.path))

    def part_path(self, job_id: int, batch: int, attempt: int) -> str:
        # Attempt ids in the name fence zombies: a late writer never overwrites a
        # committed part, and the reduce reads only the committed attempt's file.
        return storage.join(self.staging_dir(job_id), f"{batch:08d}.{attempt}.{self.part_format}")

    def prepare(self, job_id: int, overwrite: bool) -> None:
        """At submit, on the server: fail now if the output cannot be produced."""
        raise NotImplementedError

    def write_part(self, job_id: int, batch: int, attempt: int, data: bytes) -> None:
        storage.write_bytes(self.part_path(job_id, batch, attempt), data, self.storage_options)

    def discard_part(self, job_id: int, batch: int, attempt: int) -> None:
        storage.remove_file(self.part_path(job_id, batch, attempt), self.storage_options)

    def stage(self, job_id: int, parts: Sequence[Part]) -> storage.StagedFile:
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


def reader_from_spec(spec: dict[str, Any]) -> InputReader:
    kind = spec.get("kind", "")
    cls = _READERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown reader kind {kind!r}; known: {', '.join(sorted(_READERS))}")
    return cls.from_spec(spec)


def writer_from_spec(spec: dict[str, Any]) -> OutputWriter:
    kind = spec.get("kind", "")
    cls = _WRITERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown writer kind {kind!r}; known: {', '.join(sorted(_WRITERS))}")
    return cls.from_spec(spec)

"""File formats' shared parts: readers over a set of files (one file, a directory or
prefix, or a glob) and writers of one file or a directory of shards."""

from __future__ import annotations

import posixpath
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import fsspec.core

from skybatch.batches import Part
from skybatch.errors import ConfigError, InputError
from skybatch.io import storage
from skybatch.io.base import InputReader, OutputWriter, content_stamp

__all__ = ["FileReader", "FileWriter", "checked_path", "normalize_columns"]


def normalize_columns(column: str | Sequence[str] | None) -> list[str] | None:
    if column is None:
        return None
    if isinstance(column, str):
        return [column]
    columns = list(column)
    if not columns or not all(isinstance(c, str) and c for c in columns):
        raise ValueError("column must be a column name or a non-empty list of names")
    return columns


def checked_path(owner: str, path: object) -> str:
    """``path`` as given to a reader or writer; an empty one is a ValueError, as in Sky Batch."""
    if path is None or path == "":
        raise ConfigError(f"{owner} path cannot be empty; name a file, directory or URL")
    if not isinstance(path, str):
        raise TypeError(f"{owner}(path): expected a string, got {type(path).__name__}")
    return path


class FileReader(InputReader):
    """An input of one file, a directory or prefix, or a glob, read in sorted order.

    A directory or prefix means every file under it whose name does not start
    with ``.`` or ``_`` (so ``_SUCCESS`` markers and ``.crc`` files are skipped).
    The server expands the list once at submit; it travels in the spec
    (``_files``) so that every agent reads the same files.
    """

    #: Always set here (a reader of the user's own may have none).
    path: str
    #: A file name for messages ("name a .jsonl file such as data.jsonl").
    example: str = "data"
    #: Set by the server while it indexes: planning checks it once per block read, so a
    #: cancel stops even a pass that finds no batch (one endless line, blank lines only).
    stop: threading.Event | None = None

    def __init__(self, path: str, storage_options: dict[str, Any] | None = None) -> None:
        name = type(self).__name__
        path = checked_path(name, path)
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"{name}(storage_options=...): expected a dict")
        self.path = storage.resolve(path)
        self.storage_options = storage_options
        # Set on the server at submit and carried in the spec to the agents, so
        # every process sees the same file list and scratch area.
        self._files: list[str] | None = None
        self._stamps: dict[str, list[Any]] | None = None
        self.scratch: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def options(self) -> dict[str, Any]:
        """Constructor arguments besides ``path`` and ``storage_options``."""
        return {}

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "kind": self.kind,
            "path": self.path,
            "storage_options": self.storage_options,
            **self.options(),
        }
        if self._files is not None:
            spec["_files"] = self._files
        if self.scratch is not None:
            spec["_scratch"] = self.scratch
        return spec

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> FileReader:
        options = {
            k: v
            for k, v in spec.items()
            if k not in ("kind", "path", "storage_options") and not k.startswith("_")
        }
        reader = cls(spec["path"], spec.get("storage_options"), **options)
        reader._files = spec.get("_files")
        reader.scratch = spec.get("_scratch")
        return reader

    def describe(self) -> str:
        return self.path

    def files(self) -> list[str]:
        if self._files is None:
            self._files = list(self._listing())
        return self._files

    def validate(self) -> None:
        listing = self._listing()
        self._files = list(listing)
        self._stamps = {url: content_stamp(info) for url, info in listing.items()}

    def fingerprint(self) -> dict[str, Any]:
        # From the listing validate() made, or a fresh one (at resume): a shard
        # added to the prefix since submit is a change too. No request per file.
        stamps, self._stamps = self._stamps, None
        if stamps is None:
            stamps = {url: content_stamp(info) for url, info in self._listing().items()}
        return stamps

    def _listing(self) -> dict[str, dict[str, Any]]:
        """The input's files, in order, with their fsspec ``info``."""
        fs, path = storage.filesystem(self.path, self.storage_options)
        if fsspec.core.has_magic(path):
            with storage.translate_errors(self.path, "list input", InputError):
                found = fs.glob(path, detail=True)
            names = sorted(p for p, info in found.items() if info.get("type") != "directory")
            if not names:
                storage.check_bucket(self.path, self.storage_options, InputError)
                raise InputError(f"no input files match {self.path}; check the pattern")
        else:
            info = storage.check_readable_location(self.path, self.storage_options)
            if info.get("type") != "directory":
                return {self.path: info}
            with storage.translate_errors(self.path, "list input", InputError):
                found = fs.find(path, detail=True)
            names = sorted(
                p
                for p, info in found.items()
                if info.get("type") != "directory"
                and not posixpath.basename(p).startswith((".", "_"))
            )
            if not names:
                raise InputError(
                    f"input {self.path} is a directory with no files in it; name a file such "
                    f"as {self.example}, a directory of them, or a glob such as data/*"
                )
        if storage.is_local(self.path):
            return {p: found[p] for p in names}
        return {fs.unstrip_protocol(p): found[p] for p in names}


class FileWriter(OutputWriter):
    """An output of one file, its parts merged in row order; or, with ``shards=True``,
    a directory of the parts themselves (``part-00000.<ext>``, ... in row order),
    published without a merge, for outputs too big to be one file.

    ``column`` selects the keys to keep (a name or a list of names), like SQL
    SELECT. Subclasses set the formats and may override :meth:`merge`.
    """

    def __init__(
        self,
        path: str,
        column: str | Sequence[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        shards: bool = False,
    ) -> None:
        self.path = storage.resolve(checked_path(type(self).__name__, path))
        self.columns = normalize_columns(column)
        self.storage_options = storage_options
        self.shards = bool(shards)

    def __repr__(self) -> str:
        col = f", column={self.columns!r}" if self.columns else ""
        shards = ", shards=True" if self.shards else ""
        return f"{type(self).__name__}({self.path!r}{col}{shards})"

    def to_spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "column": self.columns,
            "storage_options": self.storage_options,
            "shards": self.shards,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> FileWriter:
        return cls(
            spec["path"], spec.get("column"), spec.get("storage_options"), spec.get("shards", False)
        )

    def prepare(self, job_id: int, overwrite: bool) -> None:
        if self.shards:
            self.prepare_directory(job_id, overwrite)
        else:
            self.prepare_file(job_id, overwrite, f"out.{self.part_ext}")

    def output_exists(self) -> bool:
        return self.directory_has_files() if self.shards else super().output_exists()

    #: Whether :meth:`merge` concatenates parts (so they may lie in segments).
    concatenates: ClassVar[bool] = False

    def segments(self) -> bool:
        return self.concatenates and not (self.shards or self._by_batch() or self._by_upload())

    def stage(self, job_id: int | str, parts: Sequence[Part]) -> storage.Staged:
        if self.shards:
            return self.stage_shards(job_id, parts)
        return self.merge(job_id, parts)

    def merge(self, job_id: int | str, parts: Sequence[Part]) -> storage.Staged:
        """The parts, in order, as one staged file: concatenated, unless overridden."""
        return self.stage_concatenated(job_id, parts)

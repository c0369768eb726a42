"""Readers over a set of files: one file, a directory or prefix, or a glob."""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec.core

from skybatch.errors import InputError
from skybatch.io import storage
from skybatch.io.base import InputReader, content_stamp

__all__ = ["FileReader"]


class FileReader(InputReader):
    """An input of one file, a directory or prefix, or a glob, read in sorted order.

    A directory or prefix means every file under it whose name does not start
    with ``.`` or ``_`` (so ``_SUCCESS`` markers and ``.crc`` files are skipped).
    The server expands the list once at submit; it travels in the spec
    (``_files``) so that every agent reads the same files.
    """

    #: A file name for messages ("name a .jsonl file such as data.jsonl").
    example: str = "data"

    def __init__(self, path: str, storage_options: dict[str, Any] | None = None) -> None:
        name = type(self).__name__
        if not isinstance(path, str) or not path:
            raise TypeError(f"{name}(path): path must be a non-empty string")
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

"""JSON Lines: :class:`JsonReader` and :class:`JsonWriter`."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import orjson

from skybatch import defaults
from skybatch.errors import InputError, OutputError
from skybatch.io import storage
from skybatch.io.base import BatchPlan, InputReader, OutputWriter, Part

__all__ = ["JsonReader", "JsonWriter", "normalize_columns"]


def normalize_columns(column: str | Sequence[str] | None) -> list[str] | None:
    if column is None:
        return None
    if isinstance(column, str):
        return [column]
    columns = list(column)
    if not columns or not all(isinstance(c, str) and c for c in columns):
        raise ValueError("column must be a column name or a non-empty list of names")
    return columns


class JsonReader(InputReader):
    """Reads a JSONL file: one JSON object per line, each line one row.

    Blank lines are not rows. Batches are byte ranges found by one streaming
    pass on the server; each worker reads only its batches' ranges.
    """

    kind = "jsonl"

    def __init__(self, path: str, storage_options: dict[str, Any] | None = None) -> None:
        if not isinstance(path, str) or not path:
            raise TypeError("JsonReader(path): path must be a non-empty string")
        self.path = storage.resolve(path)
        self.storage_options = storage_options

    def __repr__(self) -> str:
        return f"JsonReader({self.path!r})"

    def to_spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "storage_options": self.storage_options}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> JsonReader:
        return cls(spec["path"], spec.get("storage_options"))

    def describe(self) -> str:
        return self.path

    def files(self) -> list[str]:
        return [self.path]

    def validate(self) -> None:
        fs, path = storage.filesystem(self.path, self.storage_options)
        with storage.translate_errors(self.path, "read input", InputError):
            info = fs.info(path)
        if info.get("type") == "directory":
            raise InputError(
                f"cannot read input {self.path}: it is a directory; name a .jsonl file"
            )

    def plan(self, batch_size: int) -> Iterator[BatchPlan]:
        fs, path = storage.filesystem(self.path, self.storage_options)
        planner = _Planner(self, batch_size)
        carry = b""
        with (
            storage.translate_errors(self.path, "read input", InputError),
            fs.open(path, "rb") as f,
        ):
            while chunk := f.read(defaults.INDEX_CHUNK):
                lines = (carry + chunk).split(b"\n")
                carry = lines.pop()
                yield from planner.feed(lines, last_terminated=True)
            if carry:
                yield from planner.feed([carry], last_terminated=False)
        yield from planner.finish()

    def _check(self, line: bytes, line_no: int) -> None:
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise InputError(
                f"{self.path} line {line_no}: not valid JSON ({e}); fix or remove the line"
            ) from None
        if not isinstance(value, dict):
            raise InputError(
                f"{self.path} line {line_no}: expected a JSON object such as "
                f'{{"text": "..."}}, got {type(value).__name__}; each line must be one object'
            )

    def read(self, batch: BatchPlan) -> bytes:
        return storage.read_range(self.path, batch.start, batch.end, self.storage_options)

    def split(self, batch: BatchPlan) -> list[BatchPlan]:
        data = self.read(batch)
        want = batch.row_count // 2
        pos, rows, line = 0, 0, batch.line
        for raw in data.split(b"\n"):
            size = len(raw) + 1
            if raw.strip():
                rows += 1
            pos += size
            line += 1
            if rows == want:
                break
        cut = batch.start + pos
        return [
            BatchPlan(0, batch.file, batch.start, cut, batch.row_start, want, batch.line),
            BatchPlan(
                0, batch.file, cut, batch.end, batch.row_start + want, batch.row_count - want, line
            ),
        ]


class _Planner:
    """Cuts a stream of lines into batches of ``batch_size`` rows (blank lines are no rows).

    The fast path checks a whole batch's lines with one parse; only a batch that
    fails it (a blank or malformed line) is walked line by line, which finds
    the exact line for the error message.
    """

    def __init__(self, reader: JsonReader, batch_size: int) -> None:
        self.reader = reader
        self.size = batch_size
        self.index = 0
        self.row = 0
        self.line_no = 0  # lines consumed so far
        self.pos = 0  # byte offset of the next line
        self.open: list[int] | None = None  # [start byte, first line, rows] of a batch in progress

    def _emit(self, start: int, end: int, count: int, line: int) -> BatchPlan:
        plan = BatchPlan(self.index, 0, start, end, self.row, count, line)
        self.index += 1
        self.row += count
        return plan

    def feed(self, lines: list[bytes], last_terminated: bool) -> Iterator[BatchPlan]:
        i, n, size = 0, len(lines), self.size
        while i < n:
            if self.open is None and n - i >= size and (last_terminated or n - i > size):
                group = lines[i : i + size]
                if _all_objects(group):
                    end = self.pos + sum(map(len, group)) + size
                    yield self._emit(self.pos, end, size, self.line_no + 1)
                    self.pos = end
                    self.line_no += size
                    i += size
                    continue
            line = lines[i]
            start = self.pos
            self.line_no += 1
            self.pos += len(line) + (1 if last_terminated or i < n - 1 else 0)
            i += 1
            if not line.strip():
                continue
            self.reader._check(line, self.line_no)
            if self.open is None:
                self.open = [start, self.line_no, 0]
            self.open[2] += 1
            if self.open[2] == size:
                start, first, count = self.open
                self.open = None
                yield self._emit(start, self.pos, count, first)

    def finish(self) -> Iterator[BatchPlan]:
        if self.open is not None:
            start, first, count = self.open
            self.open = None
            yield self._emit(start, self.pos, count, first)


def _all_objects(lines: list[bytes]) -> bool:
    """Whether every line is one JSON object: one parse for the lot."""
    try:
        values = orjson.loads(b"[" + b",".join(lines) + b"]")
    except orjson.JSONDecodeError:
        return False
    return len(values) == len(lines) and all(type(v) is dict for v in values)


class JsonWriter(OutputWriter):
    """Writes results as one JSONL file, one line per input row, in input order.

    ``column`` selects the keys to keep (a name or a list of names), like SQL SELECT.
    """

    kind = "jsonl"
    part_format = "jsonl"

    def __init__(
        self,
        path: str,
        column: str | Sequence[str] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(path, str) or not path:
            raise TypeError("JsonWriter(path): path must be a non-empty string")
        self.path = storage.resolve(path)
        self.columns = normalize_columns(column)
        self.storage_options = storage_options

    def __repr__(self) -> str:
        col = f", column={self.columns!r}" if self.columns else ""
        return f"JsonWriter({self.path!r}{col})"

    def to_spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "column": self.columns,
            "storage_options": self.storage_options,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> JsonWriter:
        return cls(spec["path"], spec.get("column"), spec.get("storage_options"))

    def prepare(self, job_id: int, overwrite: bool) -> None:
        fs, path = storage.filesystem(self.path, self.storage_options)
        with storage.translate_errors(self.path, "check output", OutputError):
            if fs.isdir(path):
                raise OutputError(
                    f"output {self.path} is a directory; name a file such as out.jsonl"
                )
            if not overwrite and fs.exists(path):
                raise OutputError(
                    f"output {self.path} already exists; pass overwrite=True to ds.map() "
                    "to replace it, or choose another path"
                )
        storage.check_writable(self.path, self.storage_options)
        storage.makedirs(self.staging_dir(job_id), self.storage_options)

    def stage(self, job_id: int, parts: Sequence[Part]) -> storage.StagedFile:
        staged = storage.StagedFile(self.path, self.storage_options)
        fs, _ = storage.filesystem(self.path, self.storage_options)
        try:
            with staged.open() as out:
                for part in parts:
                    url = self.part_path(job_id, part.batch, part.attempt)
                    part_path = storage.filesystem(url, self.storage_options)[1]
                    with (
                        storage.translate_errors(url, "read part", OutputError),
                        fs.open(part_path, "rb") as src,
                    ):
                        shutil.copyfileobj(src, out, 1024 * 1024)
        except BaseException:
            staged.discard()
            raise
        return staged

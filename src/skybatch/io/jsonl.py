"""JSON Lines: :class:`JsonReader` and :class:`JsonWriter`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

import fsspec
import fsspec.core
import fsspec.utils
import orjson

from skybatch import defaults
from skybatch.errors import InputError
from skybatch.io import storage
from skybatch.io.base import BatchPlan
from skybatch.io.files import FileReader, FileWriter

__all__ = ["JsonReader", "JsonWriter"]


class JsonReader(FileReader):
    """Reads JSON Lines: one JSON object per line, each line one row.

    ``path`` is one file, a directory or prefix (every file under it whose
    name does not start with ``.`` or ``_``), or a glob such as
    ``s3://bucket/prompts/*.jsonl``; several files are read in sorted order as
    one dataset. Blank lines are not rows. Batches are byte ranges found by one
    streaming pass on the server; each worker reads only its batches' ranges.

    Compressed files (``.gz``, ``.bz2``, ``.zst``, ...) cannot be range-read:
    the server decompresses them once while indexing and stores the plain
    lines in chunks of about :data:`~skybatch.defaults.SPILL_CHUNK` bytes in
    a scratch area beside the first output, which workers then range-read.
    """

    kind = "jsonl"
    payload_format = "jsonl"
    example = "data.jsonl"

    def uses_scratch(self) -> bool:
        return any(_compression(url) for url in self.files())

    def plan(self, batch_size: int) -> Iterator[BatchPlan]:
        planner = _Planner(batch_size)
        spiller = _Spill(self) if self.uses_scratch() else None
        for number, url in enumerate(self.files()):
            planner.start_file(number, url)
            # Plain files are range-read in place; only compressed ones are spilled.
            spill = spiller if _compression(url) else None
            carry = b""
            with (
                storage.translate_errors(url, "read input", InputError),
                storage.open_stream(url, self.storage_options, _compression(url)) as f,
            ):
                while chunk := f.read(defaults.INDEX_CHUNK):
                    if spill is not None:
                        spill.add(chunk)
                    lines = (carry + chunk).split(b"\n")
                    carry = lines.pop()
                    plans = planner.feed(lines, last_terminated=True)
                    yield from spill.place(plans) if spill is not None else plans
                if carry:
                    plans = planner.feed([carry], last_terminated=False)
                    yield from spill.place(plans) if spill is not None else plans
            plans = planner.finish()
            yield from spill.place(plans, last=True) if spill is not None else plans

    def _url(self, file: int) -> str:
        if file >= 0:
            return self.files()[file]
        if self.scratch is None:
            raise InputError(f"{self.path}: batch refers to a scratch chunk, but none is set")
        return _Spill.chunk_url(self.scratch, -file - 1)

    def read(self, batch: BatchPlan) -> bytes:
        return storage.read_range(
            self._url(batch.file), batch.start, batch.end, self.storage_options
        )

    def cleanup(self) -> None:
        if self.scratch is not None:
            storage.remove_tree(self.scratch, self.storage_options)

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


def _compression(url: str) -> str | None:
    return fsspec.utils.infer_compression(url)


def _check(url: str, line: bytes, line_no: int) -> None:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise InputError(
            f"{url} line {line_no}: not valid JSON ({e}); fix or remove the line"
        ) from None
    if not isinstance(value, dict):
        raise InputError(
            f"{url} line {line_no}: expected a JSON object such as "
            f'{{"text": "..."}}, got {type(value).__name__}; each line must be one object'
        )


class _Spill:
    """Stores a compressed input's plain lines in chunks of whole batches.

    The planner's offsets are offsets in the decompressed stream; a chunk holds
    the bytes of consecutive batches, and its batches are re-addressed to it
    (``file = -(chunk + 1)``, offsets relative to the chunk). A batch is handed
    out only once its chunk is stored, so no worker reads a missing chunk.
    """

    def __init__(self, reader: JsonReader) -> None:
        if reader.scratch is None:
            raise InputError(f"{reader.path} is compressed, but no scratch area was set")
        self.reader = reader
        storage.makedirs(reader.scratch, reader.storage_options)
        self.buf = bytearray()
        self.base = 0  # stream offset of buf[0]
        self.pending: list[BatchPlan] = []
        self.chunk = 0

    @staticmethod
    def chunk_url(scratch: str, chunk: int) -> str:
        return storage.join(scratch, f"{chunk:08d}.jsonl")

    def add(self, data: bytes) -> None:
        self.buf += data

    def place(self, plans: Iterable[BatchPlan], last: bool = False) -> Iterator[BatchPlan]:
        for plan in plans:
            self.pending.append(plan)
            if plan.end - self.base >= defaults.SPILL_CHUNK:
                yield from self._flush(plan.end)
        if last:
            if self.pending:
                yield from self._flush(self.pending[-1].end)
            # The next file's offsets start at 0 again.
            self.buf.clear()
            self.base = 0

    def _flush(self, end: int) -> Iterator[BatchPlan]:
        first = self.pending[0].start
        data = bytes(self.buf[first - self.base : end - self.base])
        url = self.chunk_url(self.reader.scratch or "", self.chunk)
        storage.write_atomic(url, data, self.reader.storage_options)
        file = -(self.chunk + 1)
        for p in self.pending:
            yield replace(p, file=file, start=p.start - first, end=p.end - first)
        del self.buf[: end - self.base]
        self.base = end
        self.pending = []
        self.chunk += 1


class _Planner:
    """Cuts a stream of lines into batches of ``batch_size`` rows (blank lines are no rows).

    The fast path checks a whole batch's lines with one parse; only a batch that
    fails it (a blank or malformed line) is walked line by line, which finds
    the exact line for the error message.
    """

    def __init__(self, batch_size: int) -> None:
        self.size = batch_size
        self.index = 0
        self.row = 0
        self.file = 0
        self.url = ""
        self.line_no = 0  # lines of the current file consumed so far
        self.pos = 0  # byte offset of the next line in the current file
        self.open: list[int] | None = None  # [start byte, first line, rows] of a batch in progress

    def start_file(self, file: int, url: str) -> None:
        """Batches never span files: each file's last batch may be short."""
        self.file, self.url = file, url
        self.line_no = self.pos = 0
        self.open = None

    def _emit(self, start: int, end: int, count: int, line: int) -> BatchPlan:
        plan = BatchPlan(self.index, self.file, start, end, self.row, count, line)
        self.index += 1
        self.row += count
        return plan

    def feed(self, lines: list[bytes], last_terminated: bool) -> list[BatchPlan]:
        return list(self._feed(lines, last_terminated))

    def _feed(self, lines: list[bytes], last_terminated: bool) -> Iterator[BatchPlan]:
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
            _check(self.url, line, self.line_no)
            if self.open is None:
                self.open = [start, self.line_no, 0]
            self.open[2] += 1
            if self.open[2] == size:
                start, first, count = self.open
                self.open = None
                yield self._emit(start, self.pos, count, first)

    def finish(self) -> list[BatchPlan]:
        if self.open is None:
            return []
        start, first, count = self.open
        self.open = None
        return [self._emit(start, self.pos, count, first)]


def _all_objects(lines: list[bytes]) -> bool:
    """Whether every line is one JSON object: one parse for the lot."""
    try:
        values = orjson.loads(b"[" + b",".join(lines) + b"]")
    except orjson.JSONDecodeError:
        return False
    return len(values) == len(lines) and all(type(v) is dict for v in values)


class JsonWriter(FileWriter):
    """Writes results as JSON Lines, one line per input row, in input order:
    one file, or with ``shards=True`` a directory of ``part-00000.jsonl``, ...
    ``column`` selects the keys to keep (a name or a list of names)."""

    kind = "jsonl"
    part_format = "jsonl"
    part_ext = "jsonl"

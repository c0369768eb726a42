"""JSON Lines: :class:`JsonReader` and :class:`JsonWriter`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import IO

import fsspec
import fsspec.core
import fsspec.utils
import orjson

from skybatch import defaults
from skybatch.batches import BatchPlan
from skybatch.errors import InputError
from skybatch.io import storage
from skybatch.io.formats.files import FileReader, FileWriter
from skybatch.runner import codec

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
    a scratch area beside the first output, which workers then range-read. A
    batch larger than that is a chunk of its own, written as it is decompressed:
    the server's memory does not grow with ``batch_size``.

    A line longer than :data:`~skybatch.defaults.MAX_LINE_BYTES` (256 MB; set
    ``SKYBATCH_MAX_LINE_BYTES`` in the server's environment to change it) fails
    the job, naming the file, line and byte offset.
    """

    kind = "jsonl"
    payload_format = codec.JSONL
    example = "data.jsonl"

    def uses_scratch(self) -> bool:
        return any(_compression(url) for url in self.files())

    def plan(self, batch_size: int) -> Iterator[BatchPlan]:
        planner = _Planner(batch_size)
        spiller = _Spill(self) if self.uses_scratch() else None
        try:
            yield from self._plan(planner, spiller)
        finally:
            if spiller is not None:
                spiller.discard()  # a chunk left open by an error, a stop or a closed generator

    def _plan(self, planner: _Planner, spiller: _Spill | None) -> Iterator[BatchPlan]:
        limit = defaults.MAX_LINE_BYTES
        # No line inside one block can pass the limit, so only lines spanning blocks are
        # measured: the bound costs nothing per row.
        block = min(defaults.INDEX_CHUNK, limit + 1)
        for number, url in enumerate(self.files()):
            # Plain files are range-read in place; only compressed ones are spilled (and
            # parsed here: the runner's line numbers would be the spilled chunk's).
            spill = spiller if _compression(url) else None
            planner.start_file(number, url, parse=spill is not None)
            head: list[bytes] = []  # the blocks of a line not ended yet, joined once it ends
            held = 0
            with (
                storage.translate_errors(url, "read input", InputError),
                storage.open_stream(url, self.storage_options, _compression(url)) as f,
            ):
                while chunk := f.read(block):
                    if self.stop is not None and self.stop.is_set():
                        return
                    if spill is not None:
                        spill.add(chunk)
                    nl = chunk.find(b"\n")
                    if held + (len(chunk) if nl < 0 else nl) > limit:
                        raise _too_long(url, planner.line_no + 1, planner.pos, limit)
                    if nl < 0:
                        head.append(chunk)
                        held += len(chunk)
                        if spill is not None:
                            yield from spill.place([], planner)
                        continue
                    if head:
                        head.append(chunk)
                        chunk = b"".join(head)
                    lines = chunk.split(b"\n")
                    carry = lines.pop()
                    head, held = ([carry], len(carry)) if carry else ([], 0)
                    plans = planner.feed(lines, last_terminated=True)
                    yield from spill.place(plans, planner) if spill is not None else plans
                if head:
                    plans = planner.feed([b"".join(head)], last_terminated=False)
                    yield from spill.place(plans, planner) if spill is not None else plans
            plans = planner.finish()
            yield from spill.place(plans, planner, last=True) if spill is not None else plans

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

    def source_url(self, batch: BatchPlan) -> str:
        return self._url(batch.file)

    def payload_range(self, batch: BatchPlan) -> tuple[bytes, str, int, int]:
        return b"", self._url(batch.file), batch.start, batch.end

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
        return batch.halved(batch.start + pos, want, line)


def _compression(url: str) -> str | None:
    return fsspec.utils.infer_compression(url)


def _too_long(url: str, line_no: int, offset: int, limit: int) -> InputError:
    return InputError(
        f"{url} line {line_no} (byte {offset}) is longer than the limit of {limit} bytes; "
        "check that the file is JSON Lines (one object per line), or raise the limit: set "
        "SKYBATCH_MAX_LINE_BYTES in the server's environment and restart the server"
    )


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
    (``file = -(chunk + 1)``, offsets relative to the chunk). A chunk is
    written as the stream comes, out of sight (:class:`storage.StagedFile`),
    and closed at the first batch end past :data:`~skybatch.defaults.SPILL_CHUNK`;
    its batches are handed out only once it is published, so no worker reads
    a missing chunk. A batch of any size thus makes one chunk of that size on
    storage, never in memory: only the bytes not yet known to belong to a
    batch are held (a block, the line in progress, blank lines up to a chunk).
    """

    def __init__(self, reader: JsonReader) -> None:
        if reader.scratch is None:
            raise InputError(f"{reader.path} is compressed, but no scratch area was set")
        self.reader = reader
        self.scratch = reader.scratch
        storage.makedirs(reader.scratch, reader.storage_options)
        self.buf = bytearray()  # the stream from ``pos`` on, not yet written nor dropped
        self.pos = 0
        self.first = -1  # stream offset of the open chunk's first byte; -1: none open
        self.staged: storage.StagedFile | None = None
        self.opened: contextlib.AbstractContextManager[IO[bytes]] | None = None
        self.out: IO[bytes] | None = None
        self.pending: list[BatchPlan] = []  # the open chunk's batches
        self.chunk = 0

    @staticmethod
    def chunk_url(scratch: str, chunk: int) -> str:
        return storage.join(scratch, f"{chunk:08d}.jsonl")

    def add(self, data: bytes) -> None:
        self.buf += data

    def place(
        self, plans: Iterable[BatchPlan], planner: _Planner, last: bool = False
    ) -> Iterator[BatchPlan]:
        """Hand out ``plans`` as their chunks are stored, and write or drop what the
        planner has read past them (``last``: the file ends; the next one starts at 0)."""
        for plan in plans:
            if self.out is None:
                self._open(plan.start)
            self.pending.append(plan)
            if plan.end - self.first >= defaults.SPILL_CHUNK:
                yield from self._close(plan.end)
        if last:
            if self.pending:
                yield from self._close(self.pending[-1].end)
            self.buf.clear()
            self.pos = 0
            return
        if planner.open is not None:
            # A batch in progress: its bytes go out as they come, however many rows it has.
            if self.out is None:
                self._open(planner.open[0])
            self._write(self.pos + len(self.buf))
        elif self.pending:
            if planner.pos - self.first >= defaults.SPILL_CHUNK:
                # Blank lines after the chunk's batches would pile up until the next batch
                # ends: store the chunk now instead.
                yield from self._close(self.pending[-1].end)
            else:
                self._write(self.pending[-1].end)
        if self.out is None and planner.pos > self.pos:
            # Read, and in no batch still to come: blank lines.
            del self.buf[: planner.pos - self.pos]
            self.pos = planner.pos

    def _open(self, start: int) -> None:
        del self.buf[: start - self.pos]
        self.pos = self.first = start
        self.staged = storage.StagedFile(
            self.chunk_url(self.scratch, self.chunk), self.reader.storage_options
        )
        self.opened = self.staged.open()
        self.out = self.opened.__enter__()

    def _write(self, end: int) -> None:
        """Write the stream up to ``end`` into the open chunk."""
        size = end - self.pos
        if size <= 0 or self.out is None:
            return
        with memoryview(self.buf) as view:
            self.out.write(view[:size])
        del self.buf[:size]
        self.pos = end

    def _close(self, end: int) -> Iterator[BatchPlan]:
        self._write(end)
        assert self.staged is not None and self.opened is not None
        opened, self.opened, self.out = self.opened, None, None
        opened.__exit__(None, None, None)
        self.staged.publish()
        self.staged = None
        file, first = -(self.chunk + 1), self.first
        pending, self.pending = self.pending, []
        self.chunk += 1
        self.first = -1
        for p in pending:
            yield replace(p, file=file, start=p.start - first, end=p.end - first)

    def discard(self) -> None:
        """Drop a chunk still open (planning failed or stopped): no temporary file, no
        multipart upload left behind."""
        opened, staged = self.opened, self.staged
        self.opened = self.out = self.staged = None
        if opened is not None:
            with contextlib.suppress(Exception):
                opened.__exit__(_Abandoned, _Abandoned(), None)
        if staged is not None:
            staged.discard()


class _Abandoned(Exception):
    """Thrown into an open chunk's writer so that it closes without completing."""


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
        self.parse = True

    def start_file(self, file: int, url: str, parse: bool = True) -> None:
        """Batches never span files: each file's last batch may be short.

        ``parse``: check every line of a full batch by parsing it. Without it (a plain
        file, read in place by the workers) a full batch whose lines all start an
        object is taken unparsed: the runner parses each batch anyway, and a malformed
        line there fails the job naming the file and line, as here (a parse per row
        here cost as much as the runner's own)."""
        self.file, self.url, self.parse = file, url, parse
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
        # After a failed fast check, a batch's worth of lines goes the slow way before the
        # next try: retrying at every line made blank lines cost a whole batch's parse each.
        slow_until = 0
        while i < n:
            if (
                self.open is None
                and i >= slow_until
                and n - i >= size
                and (last_terminated or n - i > size)
            ):
                group = lines[i : i + size]
                if _all_objects(group) if self.parse else _all_start_objects(group):
                    end = self.pos + sum(map(len, group)) + size
                    yield self._emit(self.pos, end, size, self.line_no + 1)
                    self.pos = end
                    self.line_no += size
                    i += size
                    continue
                slow_until = i + size
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


def _all_start_objects(lines: list[bytes]) -> bool:
    """Whether every line starts a JSON object (its first byte is ``{``): one join."""
    joined = b"\n".join(lines)
    return joined[:1] == b"{" and joined.count(b"\n{") == len(lines) - 1


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

    concatenates = True
    kind = "jsonl"
    part_format = codec.JSONL
    part_ext = "jsonl"

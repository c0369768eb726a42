"""CSV: :class:`CsvReader` and :class:`CsvWriter`."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from skybatch import defaults
from skybatch.batches import BatchPlan, Part
from skybatch.errors import InputError
from skybatch.io import storage
from skybatch.io.formats.files import FileReader, FileWriter
from skybatch.runner import codec

__all__ = ["CsvReader", "CsvWriter"]


def _records(data: bytes) -> Iterator[tuple[int, int, int]]:
    """``(start, end, physical lines)`` of each CSV record in ``data``.

    A newline inside a quoted field does not end a record: RFC 4180 escapes a
    quote by doubling it, so a record ends at the first newline after which
    its quotes balance. The last record may lack its newline.
    """
    pos, start, lines, quotes = 0, 0, 0, 0
    n = len(data)
    while pos < n:
        nl = data.find(b"\n", pos)
        end = n if nl < 0 else nl + 1
        quotes += data.count(b'"', pos, end)
        lines += 1
        pos = end
        if quotes % 2 == 0:
            yield start, end, lines
            start, lines, quotes = end, 0, 0
    if start < n:
        yield start, n, lines


def _too_long(url: str, line_no: int, offset: int, limit: int) -> InputError:
    return InputError(
        f"{url} line {line_no} (byte {offset}) starts a record longer than the limit of "
        f'{limit} bytes; check for a quote (") left open, or raise the limit: set '
        "SKYBATCH_MAX_LINE_BYTES in the server's environment and restart the server"
    )


def _scan(f: Any, stop: threading.Event | None) -> Iterator[tuple[int, int, int, bool]]:
    """``(start, end, physical lines, blank)`` of each record of stream ``f``, as
    :func:`_records` cuts them, reading blocks of :data:`~skybatch.defaults.INDEX_CHUNK`.

    Each byte is scanned once and no record is held: a record's state (start,
    lines, quote parity) is carried from block to block, and inside a quoted
    field only quotes and newlines are looked for, at C speed. Rescanning the
    carried record per block made a quote left open quadratic (32 MB: 26 s).
    A record still open after a block is yielded only when it ends; one that
    passes ``MAX_LINE_BYTES`` raises at the block where it does, via a record
    yielded early (``end`` the bytes seen so far), which the caller refuses.
    """
    limit = defaults.MAX_LINE_BYTES
    offset = 0  # stream offset of the block's first byte
    start = -1  # stream offset of the record in progress; -1: none
    lines = 0
    quoted = False  # inside a quoted field: a newline does not end the record
    blank = True  # no byte of the record so far but whitespace (so no quote either)
    while True:
        if stop is not None and stop.is_set():
            return
        data = f.read(defaults.INDEX_CHUNK)
        if not data:
            break
        pos, n = 0, len(data)
        while pos < n:
            if start < 0:
                start, lines, quoted, blank = offset + pos, 0, False, True
            if quoted:
                q = data.find(b'"', pos)
                if q < 0:
                    lines += data.count(b"\n", pos)
                    break
                lines += data.count(b"\n", pos, q)
                pos, quoted = q + 1, False
                continue
            nl = data.find(b"\n", pos)
            stop_at = n if nl < 0 else nl
            if data.count(b'"', pos, stop_at) % 2:
                quoted, blank = True, False
                if nl < 0:
                    break
                lines, pos = lines + 1, nl + 1
                continue
            if blank and pos < stop_at and (data[pos] not in _SPACE or data[pos:stop_at].strip()):
                blank = False
            if nl < 0:
                break
            pos = nl + 1
            yield start, offset + pos, lines + 1, blank
            start = -1
        offset += n
        if start >= 0 and offset - start > limit:
            yield start, offset, lines, False
            return
    if start >= 0:
        yield start, offset, lines + 1, blank


_SPACE = frozenset(b" \t\r\n\x0b\x0c")


class CsvReader(FileReader):
    """Reads CSV with a header row: each record is one row, keyed by the header.

    Values are strings, as in the file (an empty field is ``""``). Quoted
    fields may hold commas and newlines. Several files (a prefix or glob) are
    read in sorted order; each has its own header. Batches are byte ranges of
    whole records; each worker reads only its batches' ranges (and the
    header). Compressed CSV is not supported: decompress it, or use JSONL.
    """

    kind = "csv"
    payload_format = codec.CSV
    example = "data.csv"

    def __init__(self, path: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(path, storage_options)
        self._headers: dict[int, bytes] = {}

    def validate(self) -> None:
        super().validate()
        for url in self.files():
            if url.endswith((".gz", ".bz2", ".zst", ".xz")):
                raise InputError(
                    f"{url}: compressed CSV cannot be read in byte ranges; decompress it, or "
                    "convert it to JSONL (which skybatch decompresses for you)"
                )

    def plan(self, batch_size: int) -> Iterator[BatchPlan]:
        index = row = 0
        limit = defaults.MAX_LINE_BYTES
        for number, url in enumerate(self.files()):
            line_no = 0  # physical lines of the records before the current one
            header_seen = False
            batch: list[int] | None = None  # [start, first line, rows]
            with (
                storage.translate_errors(url, "read input", InputError),
                storage.open_stream(url, self.storage_options) as f,
            ):
                for start, end, lines, blank in _scan(f, self.stop):
                    if end - start > limit:
                        raise _too_long(url, line_no + 1, start, limit)
                    first_line = line_no + 1
                    line_no += lines
                    if blank:
                        continue
                    if not header_seen:
                        header_seen = True
                        continue
                    if batch is None:
                        batch = [start, first_line, 0]
                    batch[2] += 1
                    if batch[2] == batch_size:
                        yield BatchPlan(index, number, batch[0], end, row, batch_size, batch[1])
                        index, row, batch = index + 1, row + batch_size, None
                if self.stop is not None and self.stop.is_set():
                    return
            if batch is not None:
                yield BatchPlan(index, number, batch[0], end, row, batch[2], batch[1])
                index, row = index + 1, row + batch[2]
            if not header_seen:
                raise InputError(f"{url}: the file is empty; a CSV input needs a header row")

    def _header(self, file: int) -> bytes:
        header = self._headers.get(file)
        if header is None:
            url = self.files()[file]
            size = 64 * 1024
            while True:
                data = storage.read_range(url, 0, size, self.storage_options)
                found = next(
                    (
                        data[s:e]
                        for s, e, _ in _records(data)
                        if data[s:e].strip() and e < len(data)
                    ),
                    None,
                )
                if found is not None or len(data) < size:
                    header = found if found is not None else data
                    break
                size *= 4
            self._headers[file] = header
        return header

    def read(self, batch: BatchPlan) -> bytes:
        url = self.files()[batch.file]
        body = storage.read_range(url, batch.start, batch.end, self.storage_options)
        header = self._header(batch.file)
        if not header.endswith(b"\n"):
            header += b"\n"
        return header + body

    def source_url(self, batch: BatchPlan) -> str:
        return self.files()[batch.file]

    def payload_range(self, batch: BatchPlan) -> tuple[bytes, str, int, int]:
        header = self._header(batch.file)
        if not header.endswith(b"\n"):
            header += b"\n"
        return header, self.files()[batch.file], batch.start, batch.end

    def split(self, batch: BatchPlan) -> list[BatchPlan]:
        url = self.files()[batch.file]
        data = storage.read_range(url, batch.start, batch.end, self.storage_options)
        want = batch.row_count // 2
        rows, line, cut = 0, batch.line, 0
        for _, end, lines in _records(data):
            if data[cut:end].strip():
                rows += 1
            line += lines
            cut = end
            if rows == want:
                break
        return batch.halved(batch.start + cut, want, line)


class CsvWriter(FileWriter):
    """Writes results as CSV with a header row, one record per input row: one file,
    or with ``shards=True`` a directory of ``part-00000.csv``, ... (each with its header).

    The columns are ``column`` (a name or a list) or, without it, the keys of
    the first result; every result must have the same keys. ``None`` becomes
    an empty field, lists and dicts become JSON text, numpy values numbers.
    """

    concatenates = True
    kind = "csv"
    part_format = codec.CSV
    part_ext = "csv"

    def merge(self, job_id: int | str, parts: Sequence[Part]) -> storage.Staged:
        # Every part starts with its header line; the output has one.
        return self.stage_concatenated(job_id, parts, skip_first_line=True)

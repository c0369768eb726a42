"""Parquet: :class:`ParquetReader` and :class:`ParquetWriter` (pyarrow)."""

from __future__ import annotations

import bisect
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from skybatch.batches import BatchPlan, Part
from skybatch.errors import InputError, OutputError
from skybatch.io import storage
from skybatch.io.formats.files import FileReader, FileWriter, normalize_columns
from skybatch.runner import codec

__all__ = ["ParquetReader", "ParquetWriter"]


def _open_parquet(
    url: str, storage_options: dict[str, Any] | None, metadata: pq.FileMetaData | None = None
) -> pq.ParquetFile:
    fs, path = storage.filesystem(url, storage_options)
    # No read-ahead: pyarrow asks for exactly the footer and the column chunks it needs.
    f = path if storage.is_local(url) else fs.open(path, "rb", cache_type="none")
    return pq.ParquetFile(f, metadata=metadata)


class ParquetReader(FileReader):
    """Reads Parquet files; each row is a dict of column to value.

    Batches are planned from the files' row-group metadata (the footers only),
    and a worker reads only the row groups its batch touches, and only the
    ``columns`` asked for (all by default). Values keep their types: ints,
    floats, strings, bytes, lists, structs (as dicts), timestamps, nulls.
    """

    kind = "parquet"
    payload_format = codec.RECORDS
    example = "data.parquet"

    def __init__(
        self,
        path: str,
        storage_options: dict[str, Any] | None = None,
        columns: Sequence[str] | None = None,
    ) -> None:
        super().__init__(path, storage_options)
        self.columns = normalize_columns(columns)
        # Per file, read once per process: its footer and the first row of each row
        # group (plus the end), so a batch's read fetches only its column chunks.
        self._footers: dict[int, pq.FileMetaData] = {}
        self._groups: dict[int, list[int]] = {}

    def options(self) -> dict[str, Any]:
        return {"columns": self.columns}

    def validate(self) -> None:
        super().validate()
        schema = self._footer(0).schema.to_arrow_schema()
        missing = [c for c in self.columns or [] if c not in schema.names]
        if missing:
            raise InputError(
                f"{self.files()[0]} has no column {missing[0]!r}; its columns are {schema.names!r}"
            )

    def _footer(self, file: int) -> pq.FileMetaData:
        meta = self._footers.get(file)
        if meta is None:
            url = self.files()[file]
            with storage.translate_errors(url, "read Parquet footer of", InputError):
                try:
                    meta = _open_parquet(url, self.storage_options).metadata
                except pa.ArrowInvalid as e:
                    raise InputError(f"{url} is not a Parquet file ({e})") from None
            self._footers[file] = meta
        return meta

    def _row_groups(self, file: int) -> list[int]:
        starts = self._groups.get(file)
        if starts is None:
            meta = self._footer(file)
            starts, row = [], 0
            for g in range(meta.num_row_groups):
                starts.append(row)
                row += meta.row_group(g).num_rows
            starts.append(row)  # the end
            self._groups[file] = starts
        return starts

    def plan(self, batch_size: int) -> Iterator[BatchPlan]:
        index = row = 0
        for number in range(len(self.files())):
            total = self._row_groups(number)[-1]
            for start in range(0, total, batch_size):
                count = min(batch_size, total - start)
                # start/end are row offsets within the file; line is the 1-based row.
                yield BatchPlan(index, number, start, start + count, row, count, start + 1)
                index, row = index + 1, row + count

    def read(self, batch: BatchPlan) -> bytes:
        url = self.files()[batch.file]
        starts = self._row_groups(batch.file)
        first = bisect.bisect_right(starts, batch.start) - 1
        last = bisect.bisect_left(starts, batch.end) - 1
        with storage.translate_errors(url, "read", InputError):
            parquet = _open_parquet(url, self.storage_options, self._footer(batch.file))
            table = parquet.read_row_groups(list(range(first, last + 1)), columns=self.columns)
        rows = table.slice(batch.start - starts[first], batch.row_count).to_pylist()
        return pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)

    def source_url(self, batch: BatchPlan) -> str:
        return self.files()[batch.file]


class ParquetWriter(FileWriter):
    """Writes results as Parquet: one file (default) or, with ``shards=True``, a
    directory of part files (``part-00000.parquet``, ...) published without a merge.

    Types come from the values: ints, floats, strings, bytes, bools, lists
    (numpy arrays too), dicts as structs, ``None`` as null. Batches whose
    types differ compatibly (int and float, null and anything) are unified in
    the single file; incompatible ones fail the job, naming the column.
    """

    kind = "parquet"
    part_format = codec.RECORDS
    part_ext = "parquet"

    def encode_part(self, batch: int, data: bytes) -> bytes:
        rows = pickle.loads(data)  # plain values from this job's runner
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise OutputError(
                f"{self.path}: the results of batch {batch} mix types within a column ({e}); "
                "give each column one type"
            ) from None
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        encoded: bytes = sink.getvalue().to_pybytes()
        return encoded

    def merge(self, job_id: int | str, parts: Sequence[Part]) -> storage.Staged:
        urls = [self.part_path(job_id, p.batch, p.attempt) for p in parts]
        schemas = []
        for url in urls:
            with storage.translate_errors(url, "read part", OutputError):
                schemas.append(_open_parquet(url, self.storage_options).schema_arrow)
        try:
            schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else None
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise OutputError(
                f"{self.path}: batches disagree on a column's type ({e}); give each column one "
                "type in every result, or write shards=True (each file keeps its own schema)"
            ) from None
        staged = self.staged_file(job_id)
        try:
            with staged.open() as out:
                if schema is None:
                    pq.write_table(pa.table({}), out)
                    return staged
                with pq.ParquetWriter(out, schema) as writer:
                    for url in urls:
                        # One part in memory at a time.
                        with storage.translate_errors(url, "read part", OutputError):
                            table = _open_parquet(url, self.storage_options).read()
                        for field in schema:
                            if field.name not in table.column_names:
                                table = table.append_column(
                                    field, pa.nulls(table.num_rows, field.type)
                                )
                        writer.write_table(table.select(schema.names).cast(schema))
        except BaseException:
            staged.discard()
            raise
        return staged

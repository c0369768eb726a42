"""The format contract: what the server, the agents and the runner rely on, run against
every built-in format (and a custom one), on ``memory://`` and on local files.

A batch's path, as each process takes it: the server plans the input
(``plan``) and, for a poison row, halves a batch (``split``); the agent reads
a batch (``read``); the runner decodes it and encodes the results by the
format's codec tags (``runner/codec.py``); the agent writes the part
(``write_part``); the server stages and publishes the output. Readers and
writers are rebuilt from their specs at each step, as they travel.

A new format subclasses :class:`FormatContract` (or :class:`ReaderContract` or
:class:`WriterContract` alone) and supplies its sample rows, how to make its
reader and writer, how to store an input, and how to read a published output.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from skybatch import (
    CsvReader,
    CsvWriter,
    ImageWriter,
    JsonReader,
    JsonWriter,
    ParquetReader,
    ParquetWriter,
)
from skybatch.batches import BatchPlan, Part
from skybatch.io.base import InputReader, OutputWriter
from skybatch.io.registry import reader_from_spec, writer_from_spec
from skybatch.runner import codec

JOB = 7


@pytest.fixture(params=["memory", "local"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A directory to read and write in: in fsspec's memory filesystem, or on disk."""
    if request.param == "local":
        yield str(tmp_path)
        return
    root = f"memory://skybatch-contract-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _put(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as f:
        f.write(data)


def _get(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        data: bytes = f.read()
    return data


def _decode(reader: InputReader, batch: BatchPlan) -> list[dict[str, Any]]:
    """A batch's rows as the runner sees them: read by the agent, decoded by its tag."""
    return codec.DECODERS[reader.payload_format](reader.read(batch))


def _encode(writer: OutputWriter, rows: list[dict[str, Any]], row_start: int) -> bytes:
    """One part, as the runner formats it for this writer."""
    spec = writer.runner_spec()
    names = {}
    if spec["format"] == codec.IMAGE:
        names[spec["column"]] = codec.image_names(rows, spec, row_start)
    return codec.encode_part(rows, spec, names)


class ReaderContract:
    #: Five sample rows, as the runner decodes them from this format's input.
    rows: ClassVar[list[dict[str, Any]]]
    #: The input's file name.
    input_name: ClassVar[str]

    def make_reader(self, url: str) -> InputReader:
        raise NotImplementedError

    def write_input(self, url: str, rows: list[dict[str, Any]]) -> None:
        """Store ``rows`` as this format's input at ``url`` (none: an empty input)."""
        raise NotImplementedError

    def submitted(self, base: str, rows: list[dict[str, Any]]) -> InputReader:
        """The reader as the server and agents have it: validated at submit, then a spec."""
        url = f"{base}/{self.input_name}"
        self.write_input(url, rows)
        reader = self.make_reader(url)
        reader.validate()
        return reader_from_spec(reader.to_spec())

    def test_plan_then_read_gives_every_row_in_order(self, base: str) -> None:
        reader = self.submitted(base, self.rows)
        plans = list(reader.plan(2))
        assert [(p.index, p.row_start, p.row_count) for p in plans] == [
            (0, 0, 2),
            (1, 2, 2),
            (2, 4, 1),
        ]
        assert [row for p in plans for row in _decode(reader, p)] == self.rows

    def test_split_halves_a_batch(self, base: str) -> None:
        reader = self.submitted(base, self.rows)
        (whole,) = reader.plan(5)
        first, second = reader.split(whole)
        assert (first.row_start, first.row_count) == (0, 2)
        assert (second.row_start, second.row_count) == (2, 3)
        assert _decode(reader, first) == self.rows[:2]
        assert _decode(reader, second) == self.rows[2:]
        assert first.line == whole.line < second.line

    def test_an_empty_input_has_no_batches(self, base: str) -> None:
        assert list(self.submitted(base, []).plan(2)) == []

    def test_one_row(self, base: str) -> None:
        reader = self.submitted(base, self.rows[:1])
        (plan,) = reader.plan(2)
        assert (plan.row_start, plan.row_count) == (0, 1)
        assert _decode(reader, plan) == self.rows[:1]


class WriterContract:
    #: Five sample rows, as the mapper returns them for this format's output.
    results: ClassVar[list[dict[str, Any]]]
    #: The output's name (a file, or a directory for writers of several files).
    output_name: ClassVar[str]

    def make_writer(self, url: str) -> OutputWriter:
        raise NotImplementedError

    def read_output(self, url: str) -> list[dict[str, Any]]:
        """What the published output at ``url`` holds, as rows."""
        raise NotImplementedError

    def published(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What :meth:`read_output` gives for ``results`` written in order."""
        return results

    def publish(self, base: str, batches: list[list[dict[str, Any]]]) -> str:
        """Each batch's part written (as the agent does), then staged and published (as the
        server does); the output's url."""
        url = f"{base}/{self.output_name}"
        submitted = self.make_writer(url)
        writer = writer_from_spec({**submitted.to_spec(), "_staging": "contract"})
        writer.prepare(JOB, overwrite=False)
        parts, row = [], 0
        for index, rows in enumerate(batches):
            writer.write_part(JOB, index, 1, _encode(writer, rows, row))
            parts.append(Part(index, 1, row, len(rows)))
            row += len(rows)
        writer.stage(JOB, parts).publish()
        writer.cleanup(JOB)
        return url

    def test_parts_published_in_order(self, base: str) -> None:
        r = self.results
        url = self.publish(base, [r[:2], r[2:4], r[4:]])
        assert self.read_output(url) == self.published(r)

    def test_no_parts_publish_an_empty_output(self, base: str) -> None:
        assert self.read_output(self.publish(base, [])) == []

    def test_one_row(self, base: str) -> None:
        url = self.publish(base, [self.results[:1]])
        assert self.read_output(url) == self.published(self.results[:1])


class FormatContract(ReaderContract, WriterContract):
    """A format that reads and writes: its rows go through the whole path and come back."""

    @property
    def results(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.rows

    def test_round_trip(self, base: str) -> None:
        reader = self.submitted(base, self.rows)
        first, *rest = reader.plan(2)
        batches = [_decode(reader, half) for half in reader.split(first)]
        batches += [_decode(reader, p) for p in rest]
        url = self.publish(base, batches)
        assert self.read_output(url) == self.rows


class TestJsonl(FormatContract):
    rows: ClassVar[list[dict[str, Any]]] = [
        {"id": 0, "text": "plain"},
        {"id": 1, "text": "ünïcødé ✓", "score": 0.5},
        {"id": 2, "text": "", "none": None, "flag": True},
        {"id": 3, "text": "x", "list": [1, "a", None], "map": {"k": [2.5]}},
        {"id": 4, "text": 'line\nbreak and "quotes"'},
    ]
    input_name = "in.jsonl"
    output_name = "out.jsonl"

    def make_reader(self, url: str) -> InputReader:
        return JsonReader(url)

    def write_input(self, url: str, rows: list[dict[str, Any]]) -> None:
        _put(url, b"".join(json.dumps(r).encode() + b"\n" for r in rows))

    def make_writer(self, url: str) -> OutputWriter:
        return JsonWriter(url)

    def read_output(self, url: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in _get(url).splitlines()]


class TestJsonlShards(WriterContract):
    results: ClassVar[list[dict[str, Any]]] = TestJsonl.rows
    output_name = "shards"

    def make_writer(self, url: str) -> OutputWriter:
        return JsonWriter(url, shards=True)

    def read_output(self, url: str) -> list[dict[str, Any]]:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            return []
        files = sorted(fs.find(path))
        assert [f.rsplit("/", 1)[-1] for f in files] == [
            f"part-{n:05d}.jsonl" for n in range(len(files))
        ]
        return [json.loads(line) for f in files for line in fs.cat_file(f).splitlines()]


class TestCsv(FormatContract):
    # A CSV reader gives strings, as in the file.
    rows: ClassVar[list[dict[str, Any]]] = [
        {"id": "0", "text": "plain"},
        {"id": "1", "text": "a, comma"},
        {"id": "2", "text": 'say "hi"'},
        {"id": "3", "text": "two\nlines"},
        {"id": "4", "text": ""},
    ]
    input_name = "in.csv"
    output_name = "out.csv"

    def make_reader(self, url: str) -> InputReader:
        return CsvReader(url)

    def write_input(self, url: str, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(self.rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        _put(url, buf.getvalue().encode())

    def make_writer(self, url: str) -> OutputWriter:
        return CsvWriter(url)

    def read_output(self, url: str) -> list[dict[str, Any]]:
        return list(csv.DictReader(io.StringIO(_get(url).decode(), newline="")))


class TestParquet(FormatContract):
    rows: ClassVar[list[dict[str, Any]]] = [
        {"i": i, "f": i / 4, "s": f"row {i}", "b": bytes([i]), "l": [i, i + 1], "m": maybe}
        for i, maybe in enumerate([None, "x", None, "y", "z"])
    ]
    input_name = "in.parquet"
    output_name = "out.parquet"

    def make_reader(self, url: str) -> InputReader:
        return ParquetReader(url)

    def write_input(self, url: str, rows: list[dict[str, Any]]) -> None:
        schema = pa.Table.from_pylist(self.rows).schema
        sink = pa.BufferOutputStream()
        # Row groups of 3: batches of 2 cross them.
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, row_group_size=3)
        _put(url, sink.getvalue().to_pybytes())

    def make_writer(self, url: str) -> OutputWriter:
        return ParquetWriter(url)

    def read_output(self, url: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = pq.read_table(io.BytesIO(_get(url))).to_pylist()
        return rows


def _color(i: int) -> tuple[int, int, int]:
    return (i * 40, 255 - i * 40, 7)


class TestImages(WriterContract):
    results: ClassVar[list[dict[str, Any]]] = [
        {"image": Image.new("RGB", (4, 3), _color(i)), "id": i} for i in range(5)
    ]
    output_name = "images"

    def make_writer(self, url: str) -> OutputWriter:
        return ImageWriter(url)

    def read_output(self, url: str) -> list[dict[str, Any]]:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            return []
        out = []
        for f in sorted(fs.find(path)):
            with Image.open(io.BytesIO(fs.cat_file(f))) as img:
                out.append({"name": f.rsplit("/", 1)[-1], "pixel": img.getpixel((0, 0))})
        return out

    def published(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"name": f"{r['id']:08d}.png", "pixel": _color(r["id"])} for r in results]


class ListReader(InputReader):
    """A custom reader (the ``__len__``/``download_batch`` interface) of a JSON list."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __len__(self) -> int:
        with fsspec.open(self.path, "rb") as f:
            return len(json.load(f))

    def download_batch(self, start_idx: int, end_idx: int, cache_dir: str) -> list[dict[str, Any]]:
        with fsspec.open(self.path, "rb") as f:
            rows: list[dict[str, Any]] = json.load(f)[start_idx : end_idx + 1]
        return rows


class LinesWriter(OutputWriter):
    """A custom writer (the ``write_batch`` interface): JSON lines, keys sorted."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write_batch(self, rows: list[dict[str, Any]]) -> bytes:
        return b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rows)


class TestCustom(FormatContract):
    rows: ClassVar[list[dict[str, Any]]] = [{"n": i, "s": f"row {i}"} for i in range(5)]
    input_name = "in.json"
    output_name = "out.txt"

    @pytest.fixture(autouse=True)
    def _cache_in_tmp(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        # A custom reader's read() gives download_batch a cache directory in the cwd.
        monkeypatch.chdir(tmp_path)

    def make_reader(self, url: str) -> InputReader:
        return ListReader(url)

    def write_input(self, url: str, rows: list[dict[str, Any]]) -> None:
        _put(url, json.dumps(rows).encode())

    def submitted(self, base: str, rows: list[dict[str, Any]]) -> InputReader:
        reader = super().submitted(base, rows)
        assert reader.to_spec()["kind"] == "custom"
        return reader

    def make_writer(self, url: str) -> OutputWriter:
        return LinesWriter(url)

    def read_output(self, url: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in _get(url).splitlines()]

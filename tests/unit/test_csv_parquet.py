"""CSV planning (quoted newlines, chunk edges) and Parquet row-group planning."""

from __future__ import annotations

import csv
import io
import pickle
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from skybatch import defaults
from skybatch.errors import InputError
from skybatch.io.formats.csv import CsvReader
from skybatch.io.formats.parquet import ParquetReader


def csv_rows(reader: CsvReader, batch_size: int) -> list[list[dict[str, str]]]:
    reader.validate()
    out = []
    for plan in reader.plan(batch_size):
        payload = reader.read(plan)
        rows = list(csv.DictReader(io.StringIO(payload.decode(), newline="")))
        assert len(rows) == plan.row_count
        out.append(rows)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_csv_batches_keep_quoted_newlines_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(defaults, "INDEX_CHUNK", rng.choice([7, 33, 4096]))
    rows = [
        {
            "id": str(i),
            "text": rng.choice(["plain", 'say "hi"', "a,b", "two\nlines", "x\r\ny", ""]),
        }
        for i in range(rng.randint(1, 40))
    ]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, ["id", "text"], lineterminator=rng.choice(["\n", "\r\n"]))
    w.writeheader()
    w.writerows(rows)
    path = tmp_path / "d.csv"
    path.write_bytes(buf.getvalue().encode())
    size = rng.randint(1, 6)
    batches = csv_rows(CsvReader(str(path)), size)
    assert [r for b in batches for r in b] == rows
    assert all(len(b) == size for b in batches[:-1])


def test_csv_line_numbers_and_split(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('id,text\n0,"a\nb"\n1,c\n\n2,d\n3,e\n')
    reader = CsvReader(str(path))
    reader.validate()
    plans = list(reader.plan(3))
    assert [(p.row_start, p.row_count, p.line) for p in plans] == [(0, 3, 2), (3, 1, 7)]
    halves = reader.split(plans[0])
    got = [
        [r["id"] for r in csv.DictReader(io.StringIO(reader.read(h).decode(), newline=""))]
        for h in halves
    ]
    assert got == [["0"], ["1", "2"]]
    assert [h.line for h in halves] == [2, 4]


def test_csv_without_header_is_refused(tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("")
    reader = CsvReader(str(tmp_path / "e.csv"))
    reader.validate()
    with pytest.raises(InputError, match=r"e.csv: the file is empty; a CSV input needs a header"):
        list(reader.plan(2))


@pytest.mark.parametrize("chunk", [7, 4 * 1024 * 1024])
def test_csv_record_longer_than_the_limit_names_line_and_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(defaults, "INDEX_CHUNK", chunk)
    monkeypatch.setattr(defaults, "MAX_LINE_BYTES", 50)
    path = tmp_path / "d.csv"
    head = 'id,text\n0,"a\nb"\n'
    # A quote left open makes the rest of the file one record.
    path.write_text(head + '1,"oops\n' + "2,fine\n" * 20)
    reader = CsvReader(str(path))
    reader.validate()
    with pytest.raises(InputError) as e:
        list(reader.plan(2))
    assert str(e.value) == (
        f"{path} line 4 (byte {len(head)}) starts a record longer than the limit of 50 bytes; "
        'check for a quote (") left open, or raise the limit: set SKYBATCH_MAX_LINE_BYTES in '
        "the server's environment and restart the server"
    )
    path.write_text(head + "1," + "x" * 47 + "\n")  # 50 bytes with its newline: allowed
    assert [p.row_count for p in reader.plan(2)] == [2]


def csv_reference_plan(data: bytes, batch_size: int) -> list[tuple[int, int, int, int, int]]:
    """The whole file cut by ``_records`` at once: the planner's semantics, as the oracle."""
    from skybatch.io.formats.csv import _records

    out: list[tuple[int, int, int, int, int]] = []
    batch: list[int] | None = None
    line, row, header_seen, end = 0, 0, False, 0
    for start, end, lines in _records(data):
        first, line = line + 1, line + lines
        if not data[start:end].strip():
            continue
        if not header_seen:
            header_seen = True
            continue
        if batch is None:
            batch = [start, first, 0]
        batch[2] += 1
        if batch[2] == batch_size:
            out.append((batch[0], end, row, batch_size, batch[1]))
            row, batch = row + batch_size, None
    if batch is not None:
        out.append((batch[0], end, row, batch[2], batch[1]))
    return out


@pytest.mark.parametrize("seed", range(60))
def test_csv_planning_matches_cutting_the_whole_file_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(defaults, "INDEX_CHUNK", rng.choice([1, 2, 3, 5, 8, 64]))
    # Quotes, doubled quotes, quotes left open, blank and whitespace lines, CRLF.
    pieces = [b"a", b",", b'"', b'""', b"\n", b"\r\n", b" ", b"\t", b"\n\n"]
    data = b"h1,h2\n" + b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 80)))
    path = tmp_path / "d.csv"
    path.write_bytes(data)
    size = rng.randint(1, 4)
    got = [
        (p.start, p.end, p.row_start, p.row_count, p.line) for p in CsvReader(str(path)).plan(size)
    ]
    assert got == csv_reference_plan(data, size)


def test_a_quote_left_open_is_scanned_once_holding_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tracemalloc

    monkeypatch.setattr(defaults, "INDEX_CHUNK", 256 * 1024)
    monkeypatch.setattr(defaults, "MAX_LINE_BYTES", 8 * 1024 * 1024)
    path = tmp_path / "d.csv"
    head = b"a,b\n0,fine\n"
    with open(path, "wb") as f:
        f.write(head + b'1,"x\n' + b"a\n" * (6 * 1024 * 1024))  # 12 MB in one record
    reader = CsvReader(str(path))
    reader.validate()
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as e:
            list(reader.plan(10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value) == (
        f"{path} line 3 (byte {len(head)}) starts a record longer than the limit of "
        f'{8 * 1024 * 1024} bytes; check for a quote (") left open, or raise the limit: set '
        "SKYBATCH_MAX_LINE_BYTES in the server's environment and restart the server"
    )
    # Before, the open record was carried and joined to each block, then cut again line by
    # line from its start (quadratic: 32 MB took 26 s), holding copies of it (peak 17 MB here).
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes"


def test_parquet_batches_follow_row_groups_and_columns(tmp_path: Path) -> None:
    table = pa.table({"i": list(range(25)), "s": [f"r{i}" for i in range(25)], "b": [b"x"] * 25})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=10)
    pq.write_table(table.slice(0, 3), tmp_path / "b.parquet")
    reader = ParquetReader(str(tmp_path), columns=["i", "b"])
    reader.validate()
    plans = list(reader.plan(8))
    assert [(p.file, p.start, p.end, p.row_start) for p in plans] == [
        (0, 0, 8, 0), (0, 8, 16, 8), (0, 16, 24, 16), (0, 24, 25, 24), (1, 0, 3, 25)
    ]  # fmt: skip
    rows = [pickle.loads(reader.read(p)) for p in plans]
    assert rows[1][0] == {"i": 8, "b": b"x"} and rows[1][-1] == {"i": 15, "b": b"x"}
    assert [r["i"] for b in rows for r in b] == [*range(25), 0, 1, 2]
    halves = reader.split(plans[1])
    assert [[r["i"] for r in pickle.loads(reader.read(h))] for h in halves] == [
        [8, 9, 10, 11], [12, 13, 14, 15]
    ]  # fmt: skip


def test_parquet_reader_names_a_missing_column_and_a_bad_file(tmp_path: Path) -> None:
    pq.write_table(pa.table({"i": [1]}), tmp_path / "a.parquet")
    with pytest.raises(InputError, match=r"a.parquet has no column 'x'; its columns are \['i'\]"):
        ParquetReader(str(tmp_path / "a.parquet"), columns=["x"]).validate()
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(InputError, match=r"bad.parquet is not a Parquet file"):
        ParquetReader(str(tmp_path / "bad.parquet")).validate()

"""JSONL planning (byte ranges, line numbers) and ranged reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skybatch import defaults
from skybatch.errors import InputError
from skybatch.io.jsonl import JsonReader


def rows_of(reader: JsonReader, batch_size: int) -> list[list[dict[str, object]]]:
    out = []
    for plan in reader.plan(batch_size):
        data = reader.read(plan)
        rows = [json.loads(line) for line in data.splitlines() if line.strip()]
        assert len(rows) == plan.row_count
        out.append(rows)
    return out


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 100])
def test_batches_cover_every_row_once_in_order(tmp_path: Path, batch_size: int) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"i": i, "s": "é" * i}) + "\n" for i in range(20)))
    batches = rows_of(JsonReader(str(path)), batch_size)
    assert [r["i"] for b in batches for r in b] == list(range(20))
    assert all(len(b) == batch_size for b in batches[:-1])


def test_plans_carry_row_starts_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 0}\n\n{"a": 1}\n{"a": 2}\n\n\n{"a": 3}')
    plans = list(JsonReader(str(path)).plan(2))
    assert [(p.row_start, p.row_count, p.line) for p in plans] == [(0, 2, 1), (2, 2, 4)]
    assert JsonReader(str(path)).read(plans[1]).endswith(b'{"a": 3}')


def test_rows_larger_than_the_index_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defaults, "INDEX_CHUNK", 7)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"i": i, "pad": "x" * 30}) + "\n" for i in range(9)))
    batches = rows_of(JsonReader(str(path)), 4)
    assert [len(b) for b in batches] == [4, 4, 1]


def test_malformed_line_number_counts_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(InputError, match=r"d.jsonl line 3: not valid JSON"):
        list(JsonReader(str(path)).plan(10))


def test_relative_path_is_resolved_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert JsonReader("data.jsonl").path == str(tmp_path / "data.jsonl")
    assert JsonReader("file:///abs/x.jsonl").path == "/abs/x.jsonl"


def reference_plan(text: bytes, batch_size: int) -> list[tuple[int, int, int, int, int]]:
    """The obvious line-by-line planner, as the oracle for the fast one."""
    out, batch, pos, row = [], [], 0, 0
    for number, line in enumerate(text.split(b"\n"), start=1):
        end = pos + len(line) + 1
        if line.strip():
            batch.append((pos, end, number))
            if len(batch) == batch_size:
                out.append((batch[0][0], batch[-1][1], row, batch_size, batch[0][2]))
                row += batch_size
                batch = []
        pos = end
    if batch:
        out.append((batch[0][0], min(batch[-1][1], len(text)), row, len(batch), batch[0][2]))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_fast_planner_matches_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    import random

    rng = random.Random(seed)
    monkeypatch.setattr(defaults, "INDEX_CHUNK", rng.choice([5, 64, 4096]))
    parts = []
    for i in range(rng.randint(0, 60)):
        parts.append(rng.choice(["", "  ", json.dumps({"i": i, "s": "x" * rng.randint(0, 20)})]))
    text = "\n".join(parts) + rng.choice(["", "\n", "\n\n"])
    path = tmp_path / "d.jsonl"
    path.write_bytes(text.encode())
    size = rng.randint(1, 7)
    got = [
        (p.start, p.end, p.row_start, p.row_count, p.line) for p in JsonReader(str(path)).plan(size)
    ]
    expected = reference_plan(text.encode(), size)
    # Ends may differ only by trailing blank lines, which hold no rows.
    assert [g[2:] for g in got] == [e[2:] for e in expected]
    assert [g[0] for g in got] == [e[0] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert text.encode()[e[1] : g[1]].strip() == b""


def test_directory_input_reads_files_in_sorted_order_without_spanning_them(
    tmp_path: Path,
) -> None:
    data = tmp_path / "shards"
    (data / "sub").mkdir(parents=True)
    (data / "b.jsonl").write_text('{"i": 3}\n{"i": 4}\n{"i": 5}\n')
    (data / "a.jsonl").write_text('{"i": 0}\n{"i": 1}\n{"i": 2}\n')
    (data / "sub" / "c.jsonl").write_text('{"i": 6}\n')
    (data / "_SUCCESS").write_text("")
    (data / ".a.jsonl.crc").write_text("junk")
    reader = JsonReader(str(data))
    reader.validate()
    assert reader.files() == [
        str(data / "a.jsonl"),
        str(data / "b.jsonl"),
        str(data / "sub/c.jsonl"),
    ]
    plans = list(reader.plan(2))
    # Each file's last batch may be short: batches never span two files.
    assert [(p.file, p.row_start, p.row_count, p.line) for p in plans] == [
        (0, 0, 2, 1), (0, 2, 1, 3), (1, 3, 2, 1), (1, 5, 1, 3), (2, 6, 1, 1)
    ]  # fmt: skip
    assert [r["i"] for b in rows_of(reader, 2) for r in b] == list(range(7))
    # The resolved list travels in the spec, so agents read the same files.
    assert JsonReader.from_spec(reader.to_spec()).files() == reader.files()


def test_glob_and_empty_inputs(tmp_path: Path) -> None:
    (tmp_path / "x1.jsonl").write_text('{"i": 1}\n')
    (tmp_path / "x2.txt").write_text('{"i": 2}\n')
    reader = JsonReader(str(tmp_path / "x*.jsonl"))
    reader.validate()
    assert reader.files() == [str(tmp_path / "x1.jsonl")]
    with pytest.raises(InputError, match=r"no input files match .*/y\*\.jsonl; check the pattern"):
        JsonReader(str(tmp_path / "y*.jsonl")).validate()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty is a directory with no files in it"):
        JsonReader(str(tmp_path / "empty")).validate()


def test_compressed_input_is_spilled_in_chunks_of_whole_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gzip

    monkeypatch.setattr(defaults, "SPILL_CHUNK", 100)
    monkeypatch.setattr(defaults, "INDEX_CHUNK", 64)
    rows = [{"i": i, "pad": "p" * (i % 5)} for i in range(40)]
    text = "".join(json.dumps(r) + "\n" + ("\n" if i == 10 else "") for i, r in enumerate(rows))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "e.jsonl").write_text('{"i": 40}\n')
    reader = JsonReader(str(tmp_path))
    reader.validate()
    assert reader.uses_scratch()
    reader.scratch = str(tmp_path / "scratch")
    plans = list(reader.plan(3))
    gz, plain = [p for p in plans if p.file < 0], [p for p in plans if p.file >= 0]
    assert len(gz) == 14 and len(plain) == 1
    chunks = sorted((tmp_path / "scratch").iterdir())
    # Chunks of at least SPILL_CHUNK bytes, each holding whole batches.
    assert len(chunks) == len({p.file for p in gz}) > 1
    assert all(len(c.read_bytes()) >= 100 for c in chunks[:-1])
    got = [r["i"] for b in rows_of(reader, 3) for r in b]
    assert got == list(range(41))
    # Line numbers are the compressed file's own (a blank line after row 10).
    assert [p.line for p in gz[3:5]] == [10, 14]
    # Splitting a spilled batch (to isolate a poison row) reads the chunk too.
    halves = reader.split(gz[4])
    assert [json.loads(line)["i"] for h in halves for line in reader.read(h).splitlines()
            if line.strip()] == [12, 13, 14]  # fmt: skip
    reader.cleanup()
    assert not (tmp_path / "scratch").exists()


def test_malformed_line_in_a_compressed_file_names_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gzip

    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n\n[1]\n'))
    reader = JsonReader(str(path))
    reader.validate()
    reader.scratch = str(tmp_path / "scratch")
    with pytest.raises(InputError, match=r"d.jsonl.gz line 4: expected a JSON object"):
        list(reader.plan(10))


def test_fingerprint_sees_a_shard_added_since_submit(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"i": 1}\n')
    reader = JsonReader(str(tmp_path))
    reader.validate()
    at_submit = reader.fingerprint()
    assert list(at_submit) == [str(tmp_path / "a.jsonl")]
    # At resume the server rebuilds the reader from its spec and lists afresh.
    assert JsonReader.from_spec(reader.to_spec()).fingerprint() == at_submit
    (tmp_path / "b.jsonl").write_text('{"i": 2}\n')
    assert JsonReader.from_spec(reader.to_spec()).fingerprint() != at_submit

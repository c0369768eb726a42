"""JSONL planning (byte ranges, line numbers) and ranged reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skybatch import defaults
from skybatch.errors import InputError
from skybatch.io.formats.jsonl import JsonReader


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


def _too_long(url: Path, line: int, byte: int, limit: int) -> str:
    return (
        f"{url} line {line} (byte {byte}) is longer than the limit of {limit} bytes; check "
        "that the file is JSON Lines (one object per line), or raise the limit: set "
        "SKYBATCH_MAX_LINE_BYTES in the server's environment and restart the server"
    )


@pytest.mark.parametrize("chunk", [7, 4 * 1024 * 1024])
def test_a_line_longer_than_the_limit_fails_naming_file_line_and_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(defaults, "INDEX_CHUNK", chunk)
    monkeypatch.setattr(defaults, "MAX_LINE_BYTES", 100)
    path = tmp_path / "d.jsonl"
    head = '{"i": 0}\n\n{"i": 1}\n'
    at_limit = json.dumps({"pad": "x" * 89})  # exactly 100 bytes: allowed
    assert len(at_limit) == 100
    path.write_text(head + at_limit + "\n" + json.dumps({"pad": "x" * 90}) + "\n")
    with pytest.raises(InputError) as e:
        list(JsonReader(str(path)).plan(2))
    assert str(e.value) == _too_long(path, 5, len(head) + 101, 100)
    # At the limit, with or without a final newline, lines are rows.
    path.write_text(head + at_limit)
    assert [p.row_count for p in JsonReader(str(path)).plan(2)] == [2, 1]


def test_an_endless_line_fails_at_the_limit_holding_no_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tracemalloc

    monkeypatch.setattr(defaults, "MAX_LINE_BYTES", 1024 * 1024)
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"a": 1}\n{"text": "')
        f.truncate(64 * 1024 * 1024)  # sparse: a 64 MB line of NUL bytes, no newline
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as e:
            list(JsonReader(str(path)).plan(10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value) == _too_long(path, 2, 9, 1024 * 1024)
    # Before the bound the whole 64 MB line was held (and copied as it grew).
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes"


def test_a_compressed_input_holds_neither_blank_lines_nor_an_endless_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gzip
    import tracemalloc

    monkeypatch.setattr(defaults, "INDEX_CHUNK", 256 * 1024)
    monkeypatch.setattr(defaults, "MAX_LINE_BYTES", 1024 * 1024)
    blank = (" " * 1023 + "\n") * (32 * 1024)  # 32 MB of blank lines between two rows
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(f'{{"i": 0}}\n{blank}{{"i": 1}}\n'.encode(), 1))
    reader = JsonReader(str(path))
    reader.validate()
    reader.scratch = str(tmp_path / "scratch")
    tracemalloc.start()
    try:
        plans = list(reader.plan(1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["i"] for b in rows_of(reader, 1) for r in b] == [0, 1]
    assert [(p.row_start, p.end - p.start) for p in plans] == [(0, 9), (1, 9)]
    # Before, the spill held every blank line until the next batch ended (32 MB and more).
    assert peak < 16 * 1024 * 1024, f"peak {peak} bytes"
    path.write_bytes(gzip.compress(b'{"i": 0}\n{"text": "' + b"x" * (2 * 1024 * 1024)))
    with pytest.raises(InputError) as e:
        list(reader.plan(2))
    assert str(e.value) == _too_long(path, 2, 9, 1024 * 1024)


def test_a_compressed_batch_of_any_size_is_spilled_as_it_comes_never_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gzip
    import tracemalloc

    monkeypatch.setattr(defaults, "INDEX_CHUNK", 256 * 1024)
    monkeypatch.setattr(defaults, "SPILL_CHUNK", 1024 * 1024)
    pad = "p" * 1000
    text = "".join(f'{{"i": {i}, "pad": "{pad}"}}\n' for i in range(32 * 1024)).encode()
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(text, 1))  # 34 MB plain, 0.2 MB compressed
    reader = JsonReader(str(path))
    reader.validate()
    reader.scratch = str(tmp_path / "scratch")
    tracemalloc.start()
    try:
        plans = list(reader.plan(20 * 1024))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Each batch is one chunk of its own size (past SPILL_CHUNK), written as it was read.
    cut = text.index(b'{"i": 20480,')
    assert [(p.file, p.start, p.end, p.row_start, p.row_count) for p in plans] == [
        (-1, 0, cut, 0, 20 * 1024), (-2, 0, len(text) - cut, 20 * 1024, 12 * 1024)
    ]  # fmt: skip
    assert sorted(c.name for c in (tmp_path / "scratch").iterdir()) == [
        "00000000.jsonl", "00000001.jsonl"
    ]  # fmt: skip
    assert reader.read(plans[0]) + reader.read(plans[1]) == text
    # Before, the spill held a batch whole until it ended, then copied it (peak 64 MB here).
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes"
    # A batch that never ends (the line after it is not JSON) leaves no chunk behind.
    reader.cleanup()
    path.write_bytes(gzip.compress(text + b"oops\n", 1))
    with pytest.raises(InputError, match=r"d.jsonl.gz line 32769: not valid JSON"):
        list(reader.plan(10**9))
    assert list((tmp_path / "scratch").iterdir()) == []


def test_planning_stops_between_blocks_once_told(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "d.jsonl"
    path.write_text("\n" * 1000 + '{"i": 0}\n')
    reader = JsonReader(str(path))
    reader.stop = threading.Event()
    reader.stop.set()
    assert list(reader.plan(1)) == []
    reader.stop.clear()
    assert len(list(reader.plan(1))) == 1

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

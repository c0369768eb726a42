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

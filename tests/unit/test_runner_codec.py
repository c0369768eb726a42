"""The runner's JSONL codec, with orjson (skybatch's own environment) and without it (a
mapper's environment that lacks it): the same rows in, the same bytes out."""

from __future__ import annotations

import datetime
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from skybatch.runner import codec

JSONL = {"format": codec.JSONL, "columns": None}


def _codec_without_orjson() -> types.ModuleType:
    """runner/codec.py loaded afresh where ``import orjson`` fails."""
    path = Path(codec.__file__)
    spec = importlib.util.spec_from_file_location("_codec_without_orjson", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("orjson")
    sys.modules["orjson"] = None  # type: ignore[assignment]  # makes the import fail
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is not None:
            sys.modules["orjson"] = saved
        else:
            del sys.modules["orjson"]
    assert module.orjson is None
    return module


@pytest.fixture(params=["orjson", "json"])
def impl(request: pytest.FixtureRequest) -> Iterator[types.ModuleType]:
    yield codec if request.param == "orjson" else _codec_without_orjson()


def test_rows_decode_alike_blank_lines_skipped(impl: types.ModuleType) -> None:
    payload = b'{"a": 1}\n\n{"b": "x\\u00e9"}\r\n   \n{"c": [1, 2.5, null]}\n'
    assert impl.DECODERS[impl.JSONL](payload) == [{"a": 1}, {"b": "xé"}, {"c": [1, 2.5, None]}]


def test_integers_past_64_bits_stay_exact(impl: types.ModuleType) -> None:
    # orjson would read them as floats: such a batch is decoded by json.
    big = 2**70 + 1
    rows = impl.DECODERS[impl.JSONL](f'{{"id": {big}}}\n{{"id": -{big}}}\n'.encode())
    assert rows == [{"id": big}, {"id": -big}]
    # 19 digits, below -2**63: orjson would read it as a float too.
    assert impl.DECODERS[impl.JSONL](b'{"id": -9300000000000000001}\n') == [
        {"id": -9300000000000000001}
    ]
    assert impl.encode_part(rows, JSONL, {}) == f'{{"id":{big}}}\n{{"id":-{big}}}\n'.encode()


def test_a_bad_line_is_named_by_its_place_in_the_batch(impl: types.ModuleType) -> None:
    with pytest.raises(impl.BadLine) as e:
        impl.DECODERS[impl.JSONL](b'{"a": 1}\n\n{"a": \n{"a": 3}\n')
    assert e.value.line == 2  # blank lines count, as in the file
    assert str(e.value).startswith("not valid JSON (")
    with pytest.raises(impl.BadLine, match=r"expected a JSON object .* got list") as e:
        impl.DECODERS[impl.JSONL](b'{"a": 1}\n[1, 2]\n')
    assert e.value.line == 1
    # Two objects on one line parse as one array with the others: still refused.
    with pytest.raises(impl.BadLine, match=r"not valid JSON \(Extra data") as e:
        impl.DECODERS[impl.JSONL](b'{"a": 1}\n{"a": 2}, {"b": 3}\n')
    assert e.value.line == 1


def test_output_bytes_do_not_depend_on_orjson() -> None:
    rows = [
        {"text": 'héllo "q" \n', "n": 3, "f": 0.1, "none": None, "l": [1, {"k": True}]},
        {"arr": np.arange(3), "scalar": np.float32(1.5), 7: "int key"},
    ]
    with_orjson = codec.encode_part(rows, JSONL, {})
    assert with_orjson == _codec_without_orjson().encode_part(rows, JSONL, {})
    assert with_orjson.decode().splitlines() == [
        '{"text":"héllo \\"q\\" \\n","n":3,"f":0.1,"none":null,"l":[1,{"k":true}]}',
        '{"arr":[0,1,2],"scalar":1.5,"7":"int key"}',
    ]


def test_a_value_json_cannot_hold_names_row_and_key(impl: types.ModuleType) -> None:
    # orjson could write a datetime; json cannot: both refuse, so a job's outcome does
    # not depend on the worker's environment.
    rows = [{"a": 1}, {"when": datetime.datetime(2026, 1, 1)}]
    with pytest.raises(impl.ResultError) as e:
        impl.encode_part(rows, JSONL, {})
    assert e.value.row == 1
    assert "key 'when': a datetime.datetime cannot be written to JSON" in str(e.value)


def test_nan_is_not_json_either_way(impl: types.ModuleType) -> None:
    # Read: refused, naming the line, as the indexer refuses it.
    with pytest.raises(impl.BadLine, match=r"not valid JSON") as e:
        impl.DECODERS[impl.JSONL](b'{"a": 1}\n{"a": NaN}\n')
    assert e.value.line == 1
    # Written: null, with orjson or without.
    rows = [{"n": float("nan"), "l": [float("inf"), 1.5], "x": np.float64("-inf")}]
    assert impl.encode_part(rows, JSONL, {}) == b'{"n":null,"l":[null,1.5],"x":null}\n'

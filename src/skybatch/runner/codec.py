"""The runner's codec: a batch's payload to rows, and result rows to one part per output.

Standard library only: the runner loads this file in the user's environment,
where skybatch may not be installed. numpy and PIL are never imported here; a
value is recognised by its type's module, since a mapper that returns a numpy
array or a PIL image has those libraries already.

Both directions are keyed by a format's *tag*, one constant below; a format
module (``skybatch/io/formats/``) names its tag as its reader's
``payload_format`` and its writer's ``part_format``, and the agent passes it on:

- :data:`JSONL`: one JSON line per row.
- :data:`CSV`: a header line, then one line per row (lists and dicts as JSON text).
- :data:`RECORDS`: the rows as a pickle of plain Python values (numpy arrays as
  lists, bytes kept): Parquet and custom formats, converted by the agent.
- :data:`IMAGE` (parts only): encoded images with their file names (see
  :func:`pack_files`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import pickle
import struct
from collections.abc import Callable
from typing import Any

try:
    # Where the mapper's environment has orjson (skybatch's own always does), rows are
    # decoded and encoded by it: several times faster than json on the per-row path.
    # Without it the standard library writes the same bytes (compact separators).
    import orjson
except ImportError:  # pragma: no cover - exercised by running the runner without it
    orjson = None  # type: ignore[assignment]

__all__ = [
    "CSV",
    "DECODERS",
    "IMAGE",
    "JSONL",
    "RECORDS",
    "BadLine",
    "ResultError",
    "encode_part",
    "image_names",
    "pack_files",
    "unpack_files",
]

#: The format tags (see the module docstring).
JSONL = "jsonl"
CSV = "csv"
RECORDS = "records"
IMAGE = "image"

_LEN = struct.Struct(">I")
_PLAIN = (str, int, float, bool, type(None))


class BadLine(Exception):
    """A line of a batch's input that is not one JSON object; ``line``: its number in
    the batch, from 0 (blank lines count, as in the file)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class ResultError(Exception):
    """A result the output cannot hold; ``row`` is the index within the batch."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _is_numpy(value: Any) -> bool:
    return type(value).__module__ == "numpy"


def _is_image(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.") and hasattr(value, "save")


def _unsupported(key: str, value: Any, output: str) -> str:
    if _is_image(value):
        return (
            f"key {key!r}: a PIL image cannot be written to {output}; add "
            f'skybatch.ImageWriter(path, column="{key}") to output=, or leave the column out '
            "with column=[...]"
        )
    if isinstance(value, (bytes, bytearray)):
        return (
            f"key {key!r}: bytes cannot be written to {output}; decode them to str, or write "
            "them with skybatch.ParquetWriter"
        )
    return (
        f"key {key!r}: a {_type_name(value)} cannot be written to {output}; use str, int, "
        "float, bool, None, bytes, numpy values, PIL images, or lists and dicts of those"
    )


def to_plain(value: Any, key: str, output: str, allow_bytes: bool) -> Any:
    """``value`` as plain Python (numpy to numbers and lists); raise ValueError if it cannot be."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (bytes, bytearray)) and allow_bytes:
        return bytes(value)
    if isinstance(value, (list, tuple)):
        return [to_plain(v, key, output, allow_bytes) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"key {key!r}: dict keys must be strings, got {_type_name(k)}")
            out[k] = to_plain(v, key, output, allow_bytes)
        return out
    if _is_numpy(value) and hasattr(value, "tolist"):
        return to_plain(value.tolist(), key, output, allow_bytes)
    raise ValueError(_unsupported(key, value, output))


def _json_default(value: Any) -> Any:
    # Called by json.dumps only for values it cannot write: the common case stays fast.
    if _is_numpy(value) and hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError


def _select(rows: list[dict[str, Any]], columns: list[str] | None) -> list[dict[str, Any]]:
    if columns is None:
        return rows
    out = []
    for i, row in enumerate(rows):
        try:
            out.append({c: row[c] for c in columns})
        except KeyError as e:
            raise ResultError(
                i,
                f"has no column {e.args[0]!r}, which an output selects (column={columns!r}); "
                f"the result has {sorted(row)!r}",
            ) from None
    return out


def _row_problem(row: dict[str, Any], output: str, allow_bytes: bool) -> str:
    for key, value in row.items():
        try:
            to_plain(value, key, output, allow_bytes)
        except ValueError as e:
            return str(e)
    return f"cannot be written to {output}"


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None, as orjson writes them (JSON has none)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if _is_numpy(value) and hasattr(value, "tolist"):
        return _finite(value.tolist())
    return value


def _dumps_std(row: dict[str, Any]) -> bytes:
    try:
        line = json.dumps(
            row, ensure_ascii=False, separators=(",", ":"), default=_json_default, allow_nan=False
        )
    except ValueError:
        line = json.dumps(
            _finite(row), ensure_ascii=False, separators=(",", ":"), default=_json_default
        )
    return (line + "\n").encode()


if orjson is not None:
    # Datetimes and dataclasses go to the default hook (and so fail as with json): a
    # result must not be writable or not depending on the worker's environment.
    _OPTIONS = (
        orjson.OPT_SERIALIZE_NUMPY
        | orjson.OPT_NON_STR_KEYS
        | orjson.OPT_PASSTHROUGH_DATETIME
        | orjson.OPT_PASSTHROUGH_DATACLASS
        | orjson.OPT_APPEND_NEWLINE
    )

    def _dumps(row: dict[str, Any]) -> bytes:
        try:
            return orjson.dumps(row, default=_json_default, option=_OPTIONS)
        except TypeError:
            # What orjson refuses and json writes (an int past 64 bits) is still written.
            return _dumps_std(row)

else:

    def _dumps(row: dict[str, Any]) -> bytes:
        return _dumps_std(row)


def _encode_jsonl(rows: list[dict[str, Any]]) -> bytes:
    # Appended one by one into one buffer: a list of a thousand small bytes from
    # orjson costs twenty times more (each holds its own over-sized allocation).
    out = bytearray()
    dumps = _dumps
    for i, row in enumerate(rows):
        try:
            out += dumps(row)
        except (TypeError, ValueError):
            raise ResultError(i, _row_problem(row, "JSON", allow_bytes=False)) from None
    return bytes(out)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return value


def _encode_csv(rows: list[dict[str, Any]], columns: list[str] | None) -> bytes:
    header = columns if columns is not None else (list(rows[0]) if rows else [])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for i, row in enumerate(rows):
        if list(row) != header and set(row) != set(header):
            raise ResultError(
                i,
                f"has columns {sorted(row)!r} but the CSV output's columns are {header!r}; "
                "every result needs the same keys (or select them with column=[...])",
            )
        cells = []
        for key in header:
            try:
                cells.append(_csv_cell(to_plain(row[key], key, "CSV", allow_bytes=False)))
            except ValueError as e:
                raise ResultError(i, str(e)) from None
        w.writerow(cells)
    return buf.getvalue().encode()


def _encode_records(rows: list[dict[str, Any]]) -> bytes:
    plain = []
    for i, row in enumerate(rows):
        try:
            plain.append({k: to_plain(v, k, "Parquet", allow_bytes=True) for k, v in row.items()})
        except ValueError as e:
            raise ResultError(i, str(e)) from None
    return pickle.dumps(plain, protocol=pickle.HIGHEST_PROTOCOL)


def pack_files(files: list[tuple[str, bytes]]) -> bytes:
    """Several named files in one part: a JSON index (names, sizes), then the bytes."""
    index = json.dumps([[name, len(data)] for name, data in files]).encode()
    return _LEN.pack(len(index)) + index + b"".join(data for _, data in files)


def unpack_files(part: bytes) -> list[tuple[str, bytes]]:
    (n,) = _LEN.unpack_from(part)
    index = json.loads(part[4 : 4 + n])
    out, pos = [], 4 + n
    for name, size in index:
        out.append((name, part[pos : pos + size]))
        pos += size
    return out


_IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


def image_names(rows: list[dict[str, Any]], spec: dict[str, Any], row_start: int) -> list[str]:
    """The file name of each row's image, relative to the ImageWriter's path."""
    ext = spec["image_format"].lower()
    ext = "jpg" if ext == "jpeg" else ext
    name_col = spec.get("name")
    if name_col is None:
        return [f"{row_start + i:08d}.{ext}" for i in range(len(rows))]
    names = []
    for i, row in enumerate(rows):
        stem = row.get(name_col)
        if not isinstance(stem, (str, int)) or isinstance(stem, bool) or not str(stem):
            raise ResultError(
                i,
                f"column {name_col!r} (the ImageWriter's name=) must hold a non-empty str or "
                f"int file stem, got {_type_name(stem)}",
            )
        stem = str(stem)
        if "/" in stem or "\\" in stem or stem in (".", ".."):
            raise ResultError(i, f"column {name_col!r}: file stem {stem!r} must not be a path")
        names.append(f"{stem}.{ext}")
    return names


def _encode_images(rows: list[dict[str, Any]], spec: dict[str, Any], names: list[str]) -> bytes:
    column = spec["column"]
    fmt = _IMAGE_FORMATS[spec["image_format"].lower()]
    files = []
    for i, (row, name) in enumerate(zip(rows, names, strict=True)):
        if column not in row:
            raise ResultError(
                i,
                f"has no column {column!r}, which an ImageWriter writes; the result has "
                f"{sorted(row)!r}",
            )
        image = row[column]
        if not _is_image(image):
            raise ResultError(
                i, f"column {column!r}: expected a PIL image, got {_type_name(image)}"
            )
        if fmt == "JPEG" and getattr(image, "mode", "RGB") not in ("RGB", "L", "CMYK"):
            image = image.convert("RGB")  # JPEG has no alpha channel
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        files.append((name, buf.getvalue()))
    return pack_files(files)


def encode_part(
    rows: list[dict[str, Any]],
    spec: dict[str, Any],
    names: dict[str, list[str]],
) -> bytes:
    """One output's part of a batch. ``names``: image column -> file names, which replace
    the images in every output that is not the ImageWriter of that column."""
    fmt = spec["format"]
    if fmt == IMAGE:
        return _encode_images(rows, spec, names[spec["column"]])
    columns = spec.get("columns")
    rows = _select(rows, columns)
    if names:
        rows = [
            {k: (names[k][i] if k in names else v) for k, v in row.items()}
            for i, row in enumerate(rows)
        ]
    if fmt == JSONL:
        return _encode_jsonl(rows)
    if fmt == CSV:
        return _encode_csv(rows, columns)
    if fmt == RECORDS:
        return _encode_records(rows)
    raise ValueError(f"unknown part format {fmt!r}")


#: Digits to "0", "-" kept, all else to " ": a number orjson would turn into a float
#: (past 64 bits: 20 digits, or "-" and 19) is then a ``find`` or two, a few microseconds
#: per batch.
_DIGITS = bytes(48 if 48 <= b <= 57 else 45 if b == 45 else 32 for b in range(256))
_LONG_NUMBER = b"0" * 20
_LONG_NEGATIVE = b"-" + b"0" * 19


def _no_constant(name: str) -> Any:
    # JSON has no NaN or Infinity: refused, as the indexer's parse (orjson) refuses them.
    raise ValueError(f"{name} is not JSON")


def _decode_jsonl(payload: bytes) -> list[dict[str, Any]]:
    digits = payload.translate(_DIGITS) if orjson is not None else b""
    if orjson is not None and digits.find(_LONG_NUMBER) < 0 and digits.find(_LONG_NEGATIVE) < 0:
        body = payload.rstrip()
        try:
            # One parse for the batch; the line by line way below finds what it refuses
            # (a blank line, skipped; a malformed one) and names the line.
            rows: list[dict[str, Any]] = orjson.loads(b"[" + body.replace(b"\n", b",") + b"]")
        except orjson.JSONDecodeError:
            pass
        else:
            # One object per line: `{"a": 1}, {"b": 2}` on one line would be two rows.
            if len(rows) == body.count(b"\n") + 1 and all(type(r) is dict for r in rows):
                return rows
    # json keeps integers of any size (orjson reads those past 64 bits as floats).
    rows = []
    for n, line in enumerate(payload.split(b"\n")):
        if not line.strip():
            continue
        try:
            value = json.loads(line, parse_constant=_no_constant)
        except ValueError as e:
            raise BadLine(n, f"not valid JSON ({e})") from None
        if type(value) is not dict:
            raise BadLine(
                n,
                f'expected a JSON object such as {{"text": "..."}}, got {type(value).__name__}; '
                "each line must be one object",
            )
        rows.append(value)
    return rows


def _decode_csv(payload: bytes) -> list[dict[str, Any]]:
    text = io.StringIO(payload.decode("utf-8-sig"), newline="")
    return [dict(row) for row in csv.DictReader(text)]


def _decode_records(payload: bytes) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pickle.loads(payload)  # from our own agent
    return rows


#: A reader's ``payload_format`` -> how the runner turns a batch's payload into rows.
DECODERS: dict[str, Callable[[bytes], list[dict[str, Any]]]] = {
    JSONL: _decode_jsonl,
    CSV: _decode_csv,
    RECORDS: _decode_records,
}

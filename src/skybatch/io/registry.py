"""Reader and writer specs to instances: a spec's ``kind`` names its format's classes.

Each built-in format is one module of ``formats/``, imported only when a spec
names its kind: the server starts without pyarrow, which Parquet alone needs.
``custom`` specs carry their class (``custom.py``).

To add a format: write ``formats/<name>.py`` with its reader and writer (each
setting ``kind``, and the tag the runner's codec is keyed by: ``payload_format``,
``part_format``), and add its ``_BUILTIN`` entry. The registry names no format
module in an import statement: the formats import ``base.py``, and the
registry sits above both.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from skybatch.io import custom
from skybatch.io.base import InputReader, OutputWriter

__all__ = ["known", "reader_class", "reader_from_spec", "writer_class", "writer_from_spec"]


@dataclass(frozen=True)
class _Entry:
    module: str
    #: The class names in ``module``; None where the format does not go that way.
    reader: str | None
    writer: str | None


_BUILTIN: dict[str, _Entry] = {
    "jsonl": _Entry("skybatch.io.formats.jsonl", "JsonReader", "JsonWriter"),
    "csv": _Entry("skybatch.io.formats.csv", "CsvReader", "CsvWriter"),
    "parquet": _Entry("skybatch.io.formats.parquet", "ParquetReader", "ParquetWriter"),
    "image": _Entry("skybatch.io.formats.images", None, "ImageWriter"),
}


def known(what: str) -> list[str]:
    """The built-in kinds of ``what`` ("reader" or "writer"), sorted."""
    return sorted(k for k, e in _BUILTIN.items() if getattr(e, what) is not None)


def _class(kind: str, what: str) -> Any:
    entry = _BUILTIN.get(kind)
    name = getattr(entry, what) if entry is not None else None
    if entry is None or name is None:
        raise ValueError(f"unknown {what} kind {kind!r}; known: {', '.join(known(what))}")
    return getattr(importlib.import_module(entry.module), name)


def reader_class(kind: str) -> type[InputReader]:
    """The built-in reader class of ``kind``; ValueError names the known ones."""
    cls: type[InputReader] = _class(kind, "reader")
    return cls


def writer_class(kind: str) -> type[OutputWriter]:
    """The built-in writer class of ``kind``; ValueError names the known ones."""
    cls: type[OutputWriter] = _class(kind, "writer")
    return cls


def reader_from_spec(spec: dict[str, Any]) -> InputReader:
    kind = spec.get("kind", "")
    if kind == custom.KIND:
        reader: InputReader = custom.from_custom_spec(spec, InputReader)
        return reader
    return reader_class(kind).from_spec(spec)


def writer_from_spec(spec: dict[str, Any]) -> OutputWriter:
    kind = spec.get("kind", "")
    if kind == custom.KIND:
        writer: OutputWriter = custom.from_custom_spec(spec, OutputWriter)
    else:
        writer = writer_class(kind).from_spec(spec)
    # object.__setattr__: a custom writer may be a frozen dataclass.
    object.__setattr__(writer, "_staging", spec.get("_staging", ""))
    return writer

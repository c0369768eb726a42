"""Sky Batch's ``sky.batch.io_formats``, for scripts ported by the rename rule::

    from skybatch import io_formats

    @registry.INPUT_READER_REGISTRY.type_register(name="range")
    @dataclass
    class RangeReader(io_formats.InputReader):
        count: int
        ...

The classes are skybatch's own (``skybatch.InputReader`` is ``io_formats.InputReader``).
"""

from __future__ import annotations

from skybatch.io.base import InputReader, OutputWriter
from skybatch.io.formats.csv import CsvReader, CsvWriter
from skybatch.io.formats.images import ImageWriter
from skybatch.io.formats.jsonl import JsonReader, JsonWriter

__all__ = [
    "CsvReader",
    "CsvWriter",
    "ImageWriter",
    "InputReader",
    "JsonReader",
    "JsonWriter",
    "OutputWriter",
]

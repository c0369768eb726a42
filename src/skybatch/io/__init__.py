"""Input and output formats over storage.

Parquet (``skybatch.io.parquetio``) is imported on first use: pyarrow is slow to import.
"""

from skybatch.io.base import InputReader, OutputWriter
from skybatch.io.csvio import CsvReader, CsvWriter
from skybatch.io.images import ImageWriter
from skybatch.io.jsonl import JsonReader, JsonWriter

__all__ = [
    "CsvReader",
    "CsvWriter",
    "ImageWriter",
    "InputReader",
    "JsonReader",
    "JsonWriter",
    "OutputWriter",
]

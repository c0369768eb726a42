"""Input and output formats over storage."""

from skybatch.io.base import BatchPlan, InputReader, OutputWriter, Part
from skybatch.io.jsonl import JsonReader, JsonWriter

__all__ = ["BatchPlan", "InputReader", "JsonReader", "JsonWriter", "OutputWriter", "Part"]

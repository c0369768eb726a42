"""The built-in formats, one module each: its reader, its writer, its codec tag.

``jsonl.py``, ``csv.py``, ``parquet.py`` (pyarrow: imported on first use, see
``io/registry.py``), ``images.py``, and ``files.py``, the part they share:
readers over a set of files and writers of one file or a directory of shards.
"""

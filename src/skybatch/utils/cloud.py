"""Sky Batch's storage helpers (``sky.batch.utils``) over skybatch's storage layer.

Same names, arguments and file layout as Sky Batch's: a job's temporary batch
files are ``<output dir>/.sky_batch_tmp/<job_id>/batch_<start>-<end>.jsonl``
(indices inclusive, 8 digits). Any URL fsspec opens works (a local path too);
credentials come from the cloud's environment, as in Sky Batch (no
``storage_options``). Errors are skybatch's (:class:`~skybatch.errors.OutputError`,
:class:`~skybatch.errors.InputError`) naming the URL; a missing ``job_id`` where
Sky Batch requires one is a ``ValueError``, as there.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
from typing import Any

from skybatch.errors import InputError, OutputError
from skybatch.io import storage

__all__ = [
    "BATCH_NAME_PATTERN",
    "INPUT_BATCH_NAME_PATTERN",
    "TEMP_DIR_NAME",
    "cloud_path_exists",
    "concatenate_batches_to_output",
    "delete_batch_files",
    "delete_input_batch_files",
    "download_file_from_cloud",
    "download_from_cloud",
    "get_batch_path",
    "get_input_batch_path",
    "list_batch_files",
    "load_jsonl_from_cloud",
    "save_jsonl_to_cloud",
    "upload_bytes_to_cloud",
    "upload_file_to_cloud",
]

#: The directory beside the output that holds a job's temporary batch files.
TEMP_DIR_NAME = ".sky_batch_tmp"
#: A result batch file's name: rows ``start`` to ``end``, inclusive.
BATCH_NAME_PATTERN = "batch_{start:08d}-{end:08d}.jsonl"
#: An input batch file's name (skybatch writes none; the helpers that delete them exist).
INPUT_BATCH_NAME_PATTERN = "input_batch_{start:08d}-{end:08d}.jsonl"


# -- whole objects -------------------------------------------------------------------


def upload_bytes_to_cloud(data: bytes, cloud_path: str) -> None:
    """Write ``data`` to ``cloud_path`` (a local path gets its directories made)."""
    _make_parent(cloud_path)
    storage.write_bytes(cloud_path, bytes(data), None)


def upload_file_to_cloud(local_path: str, cloud_path: str) -> None:
    """Copy the local file ``local_path`` to ``cloud_path``, streamed."""
    _make_parent(cloud_path)
    fs, path = storage.filesystem(cloud_path)
    with (
        storage.translate_errors(cloud_path, "write", OutputError),
        open(local_path, "rb") as src,
        fs.open(path, "wb") as dst,
    ):
        shutil.copyfileobj(src, dst, 1024 * 1024)


def download_from_cloud(path: str, dest: str) -> None:
    """Copy ``path`` to the local file ``dest``, streamed."""
    with (
        storage.translate_errors(path, "read", InputError),
        storage.open_stream(path, None) as src,
        open(dest, "wb") as dst,
    ):
        shutil.copyfileobj(src, dst, 1024 * 1024)


def download_file_from_cloud(cloud_path: str, local_path: str) -> None:
    """Sky Batch's other name for :func:`download_from_cloud`."""
    download_from_cloud(cloud_path, local_path)


def cloud_path_exists(path: str) -> bool:
    """Whether ``path`` exists; False too when it cannot be checked (as in Sky Batch)."""
    try:
        return storage.exists(path, None)
    except Exception:
        return False


def save_jsonl_to_cloud(data: list[dict[str, Any]], cloud_path: str) -> None:
    """Write the dicts as JSON Lines (``json.dumps`` of each, as Sky Batch writes them)."""
    upload_bytes_to_cloud("".join(json.dumps(item) + "\n" for item in data).encode(), cloud_path)


def load_jsonl_from_cloud(path: str) -> list[dict[str, Any]]:
    """The JSON Lines file at ``path`` as a list; blank lines are skipped."""
    out: list[dict[str, Any]] = []
    with (
        storage.translate_errors(path, "read", InputError),
        storage.open_stream(path, None) as f,
    ):
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"Invalid JSON at line {number} in {path}: {e}") from e
    return out


# -- a job's temporary batch files ---------------------------------------------------------


def _parent(url: str) -> str:
    # Sky Batch takes the key's dirname as is: "out/texts/" stages in "out/texts".
    if storage.is_local(url):
        return os.path.dirname(url)
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest) if '/' in rest else rest}"


def _temp_dir(output_path: str, job_id: str | int | None) -> str:
    base = storage.join(_parent(output_path), TEMP_DIR_NAME)
    return storage.join(base, str(job_id)) if job_id else base


def get_batch_path(
    output_path: str, start_idx: int, end_idx: int, job_id: str | int | None = None
) -> str:
    """Where the results of rows ``start_idx``-``end_idx`` (inclusive) of a job go."""
    name = BATCH_NAME_PATTERN.format(start=start_idx, end=end_idx)
    return storage.join(_temp_dir(output_path, job_id), name)


def get_input_batch_path(
    output_path: str, start_idx: int, end_idx: int, job_id: str | int | None = None
) -> str:
    """Where an input batch file of rows ``start_idx``-``end_idx`` would go."""
    name = INPUT_BATCH_NAME_PATTERN.format(start=start_idx, end=end_idx)
    return storage.join(_temp_dir(output_path, job_id), name)


def _names(directory: str) -> list[str]:
    fs, path = storage.filesystem(directory)
    with storage.translate_errors(directory, "list", OutputError):
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
    return [posixpath.basename(str(e).rstrip("/")) for e in entries]


def _start(name: str) -> int:
    # batch_00000010-00000019.jsonl -> 10
    try:
        return int(name.split("_", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return 0


def list_batch_files(output_path: str, job_id: str | int | None = None) -> list[str]:
    """The job's result batch files, by first row."""
    directory = _temp_dir(output_path, job_id)
    names = [n for n in _names(directory) if n.startswith("batch_") and n.endswith(".jsonl")]
    return [storage.join(directory, n) for n in sorted(names, key=_start)]


def _require(job_id: str | int | None, what: str) -> None:
    if job_id is None or job_id == "":
        raise ValueError(f"job_id is required for {what}()")


def _remove(urls: list[str], directory: str) -> None:
    for url in urls:
        with storage.translate_errors(url, "delete", OutputError):
            storage.remove_file(url, None)
    if storage.is_local(directory):
        # Object stores have no directories; locally, leave no empty ones behind.
        for d in (directory, os.path.dirname(directory)):
            with contextlib.suppress(OSError):
                os.rmdir(d)


def delete_batch_files(output_path: str, job_id: str | int | None = None) -> None:
    """Delete the job's result batch files (``job_id`` is required)."""
    _require(job_id, "delete_batch_files")
    _remove(list_batch_files(output_path, job_id), _temp_dir(output_path, job_id))


def delete_input_batch_files(output_path: str, job_id: str | int | None = None) -> None:
    """Delete the job's input batch files (``job_id`` is required)."""
    _require(job_id, "delete_input_batch_files")
    directory = _temp_dir(output_path, job_id)
    names = [n for n in _names(directory) if n.startswith("input_batch_")]
    _remove([storage.join(directory, n) for n in names], directory)


def concatenate_batches_to_output(output_path: str, job_id: str | int | None = None) -> None:
    """Write the job's result batch files, in row order, to ``output_path`` as one JSON
    Lines file, streamed a file at a time (Sky Batch loads them all into memory)."""
    if job_id is None or job_id == "":
        raise ValueError(
            "job_id is required for concatenate_batches_to_output() to prevent accidentally "
            "processing or deleting files from other jobs sharing the same bucket"
        )
    files = list_batch_files(output_path, job_id)
    if not files:
        return
    _make_parent(output_path)
    fs, path = storage.filesystem(output_path)
    with storage.translate_errors(output_path, "write", OutputError), fs.open(path, "wb") as out:
        for url in files:
            with (
                storage.translate_errors(url, "read", InputError),
                storage.open_stream(url, None) as src,
            ):
                last = b"\n"
                while block := src.read(1024 * 1024):
                    out.write(block)
                    last = block[-1:]
                if last != b"\n":
                    out.write(b"\n")


def _make_parent(url: str) -> None:
    if storage.is_local(url):
        storage.makedirs(os.path.dirname(os.path.abspath(url)), None)

"""skybatch: run one Python function over a large dataset on a pool of workers.

A Sky Batch script ports by renaming ``sky.batch.`` to ``skybatch.``::

    ds = skybatch.Dataset(skybatch.JsonReader("data.jsonl"))

    @skybatch.remote_function
    def double_text():
        for batch in skybatch.load():
            skybatch.save_results([{"output": item["text"] * 2} for item in batch])

    ds.map(double_text, pool_name="my-pool", batch_size=2,
           output=skybatch.JsonWriter("out.jsonl"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

from skybatch.client.admin import (
    cancel,
    jobs_queue,
    pool_apply,
    pool_down,
    pool_status,
    prune_jobs,
)
from skybatch.client.dataset import Dataset, Job
from skybatch.client.remote import RemoteFunction, remote_function
from skybatch.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    InputError,
    JobCancelledError,
    JobError,
    JobFailedError,
    MapperError,
    NotFoundError,
    OutputError,
    PoolError,
    PoolSpecError,
    ServerError,
    SkyBatchError,
)
from skybatch.io.base import InputReader, OutputWriter
from skybatch.io.csvio import CsvReader, CsvWriter
from skybatch.io.images import ImageWriter
from skybatch.io.jsonl import JsonReader, JsonWriter
from skybatch.states import JobStatus

if TYPE_CHECKING:
    from skybatch.io.parquetio import ParquetReader, ParquetWriter

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "ConfigError",
    "ConflictError",
    "CsvReader",
    "CsvWriter",
    "Dataset",
    "ImageWriter",
    "InputError",
    "InputReader",
    "Job",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobStatus",
    "JsonReader",
    "JsonWriter",
    "MapperError",
    "NotFoundError",
    "OutputError",
    "OutputWriter",
    "ParquetReader",
    "ParquetWriter",
    "PoolError",
    "PoolSpecError",
    "RemoteFunction",
    "ServerError",
    "SkyBatchError",
    "__version__",
    "cancel",
    "jobs_queue",
    "load",
    "pool_apply",
    "pool_down",
    "pool_status",
    "prune_jobs",
    "remote_function",
    "save_results",
]


def load() -> NoReturn:
    """Inside a mapper on a worker: yield the batches, each a list of dicts."""
    raise SkyBatchError(
        "skybatch.load() works only inside a mapper running on a worker; "
        "decorate the mapper with @skybatch.remote_function and pass it to ds.map(...)"
    )


def save_results(results: list[dict[str, Any]]) -> NoReturn:
    """Inside a mapper on a worker: save one dict per input row of the current batch."""
    raise SkyBatchError(
        "skybatch.save_results() works only inside a mapper running on a worker; "
        "pass the mapper to ds.map(...)"
    )


def __getattr__(name: str) -> Any:
    # Parquet needs pyarrow, slow to import: load it when a script first uses it.
    if name in ("ParquetReader", "ParquetWriter"):
        from skybatch.io import parquetio

        return getattr(parquetio, name)
    raise AttributeError(f"module 'skybatch' has no attribute {name!r}")

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

from typing import TYPE_CHECKING, Any

# Sky Batch's ``sky.batch.remote`` module: ``skybatch.remote.is_remote_function(fn)`` ports as is.
# Its ``io_formats`` and ``utils`` (custom formats) port the same way.
from skybatch import io_formats, utils
from skybatch.client import remote
from skybatch.client.admin import (
    cancel,
    jobs_queue,
    pool_apply,
    pool_down,
    pool_status,
    prune_jobs,
)
from skybatch.client.api import partial_reduce
from skybatch.client.dataset import Dataset, Job
from skybatch.client.fmap import MapJob, map
from skybatch.client.remote import (
    RemoteFunction,
    is_remote_function,
    load,
    remote_function,
    save_results,
)
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
from skybatch.io.base import InputReader, OutputWriter, set_partial_reduce
from skybatch.io.formats.csv import CsvReader, CsvWriter
from skybatch.io.formats.images import ImageWriter
from skybatch.io.formats.jsonl import JsonReader, JsonWriter
from skybatch.states import JobStatus
from skybatch.version import __version__

if TYPE_CHECKING:
    from skybatch.io.formats.parquet import ParquetReader, ParquetWriter

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
    "MapJob",
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
    "io_formats",
    "is_remote_function",
    "jobs_queue",
    "load",
    "map",
    "pool_apply",
    "pool_down",
    "pool_status",
    "prune_jobs",
    "remote",
    "remote_function",
    "save_results",
    "utils",
]

# io sits below the client, so a writer's reduce_results reaches the server through this.
set_partial_reduce(partial_reduce)


def __getattr__(name: str) -> Any:
    # Parquet needs pyarrow, slow to import: load it when a script first uses it.
    if name in ("ParquetReader", "ParquetWriter"):
        from skybatch.io.formats import parquet

        return getattr(parquet, name)
    raise AttributeError(f"module 'skybatch' has no attribute {name!r}")

"""Request and response bodies of the HTTP API (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from skybatch import defaults


class MapperSpec(BaseModel):
    name: str
    source: str
    filename: str
    aliases: dict[str, str] = {}


class JobSubmit(BaseModel):
    name: str
    pool: str
    reader: dict[str, Any]
    writers: list[dict[str, Any]]
    mapper: MapperSpec
    batch_size: int
    activate_env: str | None = None
    overwrite: bool = False
    max_retries: int = Field(default=defaults.MAX_RETRIES, ge=0)
    retry_backoff: float = Field(default=defaults.RETRY_BACKOFF, ge=0)
    batch_timeout: float | None = Field(default=None, gt=0)
    max_failed_rows: int | None = Field(default=None, ge=0)
    errors: dict[str, Any] | None = None
    #: Dataset.from_items: the rows as JSON Lines; the reader spec is then a placeholder.
    items: str | None = None


class ResumeRequest(BaseModel):
    #: The resubmitted job (ds.map(..., resume=...)), or None to rerun it as it was.
    job: JobSubmit | None = None


class JobView(BaseModel):
    id: int
    name: str
    pool: str
    status: str
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    total_batches: int
    total_rows: int
    indexed: bool
    committed_batches: int
    committed_rows: int
    failed_batches: int
    retries: int
    lost: int
    error: str | None
    version: int
    failed_rows: int = 0
    outputs: list[str]


class WorkerView(BaseModel):
    id: int
    index: int
    status: str
    pid: int | None
    error: str | None


class PoolView(BaseModel):
    name: str
    status: str
    error: str | None
    workers: int
    ready: int
    resources: dict[str, Any]
    provider: str
    worker_list: list[WorkerView]
    active_jobs: list[int]


class PoolApply(BaseModel):
    spec: dict[str, Any]


class ReduceRequest(BaseModel):
    writer: dict[str, Any]


class ReduceResult(BaseModel):
    rows: int
    missing: list[list[int]]
    path: str


class Register(BaseModel):
    pid: int


class SetupFailed(BaseModel):
    exit_code: int
    output: str


class LeaseRequest(BaseModel):
    prefetch: bool = False
    wait: float = Field(default=defaults.LEASE_WAIT, ge=0, le=60)


class Heartbeat(BaseModel):
    attempts: list[int]


class FailRequest(BaseModel):
    kind: str = Field(pattern="^(mapper|system)$")
    error: str
    traceback: str | None = None


class LogChunk(BaseModel):
    worker: int
    text: str
    offset: int  # where the next read of this worker's log starts


class LogsView(BaseModel):
    status: str
    chunks: list[LogChunk]

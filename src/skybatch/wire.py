"""Request and response bodies of the HTTP API (they make the OpenAPI schema).

Shared by the client, the server and the agent, so each body is defined once;
a batch's lease, sent once per batch, is a plain dict (``batches.LeaseBody``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator

from skybatch import defaults
from skybatch.pools.spec import job_name_error

__all__ = [
    "INT64_MAX",
    "CommitRequest",
    "FailRequest",
    "HealthReport",
    "Heartbeat",
    "Id",
    "JobFields",
    "JobSubmit",
    "JobView",
    "LeaseRequest",
    "LogChunk",
    "LogsView",
    "MapperSpec",
    "PoolApply",
    "PoolView",
    "ReduceRequest",
    "ReduceResult",
    "Register",
    "ResumeRequest",
    "ScalingView",
    "SetupFailed",
    "WorkerView",
]

#: Ids and counts are SQLite integers: past this they would overflow (a 500), so
#: the models refuse them (a 422 naming the field).
INT64_MAX = 2**63 - 1
Id = Annotated[int, Field(ge=0, le=INT64_MAX)]


class MapperSpec(BaseModel):
    name: str
    source: str
    filename: str
    aliases: dict[str, str] = {}
    #: What the mapper uses from its script, rebuilt on workers (client/remote.py's Shipment).
    globals: list[dict[str, Any]] = []
    #: ``__future__`` compiler flags of the mapper's script.
    flags: int = 0


class JobSubmit(BaseModel):
    name: str
    pool: str
    reader: dict[str, Any]
    writers: list[dict[str, Any]]
    mapper: MapperSpec
    batch_size: int = Field(le=2**31 - 1)  # below 1 gets the server's own message
    activate_env: str | None = None
    overwrite: bool = False
    # The backoff doubles with each try: past ~1000 it is no longer a float.
    max_retries: int = Field(default=defaults.MAX_RETRIES, ge=0, le=1000)
    retry_backoff: float = Field(
        default=defaults.RETRY_BACKOFF, ge=0, le=86400, allow_inf_nan=False
    )
    batch_timeout: float | None = Field(default=None, gt=0, le=10**9, allow_inf_nan=False)
    max_failed_rows: int | None = Field(default=None, ge=0, le=INT64_MAX)
    errors: dict[str, Any] | None = None
    #: Dataset.from_items: the rows as JSON Lines; the reader spec is then a placeholder.
    items: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        problem = job_name_error(v)
        if problem:
            raise ValueError(problem)
        return v


class ResumeRequest(BaseModel):
    #: The resubmitted job (ds.map(..., resume=...)), or None to rerun it as it was.
    job: JobSubmit | None = None


class JobFields(BaseModel):
    """A job's fields, declared once: the server's record (``JobRecord``, one column
    each) adds what only the server reads, and ``JobView`` what a view derives."""

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
    #: Rows isolated as poison (``max_failed_rows``).
    failed_rows: int = 0


class JobView(JobFields):
    outputs: list[str]
    #: What holds the running job back without failing it, e.g. a full disk (path and
    #: "no space left"); None when nothing does.
    health: str | None = None


class WorkerView(BaseModel):
    id: int
    index: int
    status: str
    pid: int | None
    error: str | None
    # Defaults: a newer client reads an older server's answer.
    provider: str = ""
    #: Where it runs (``localhost``, an SSH host, a Ray node), None before it started.
    host: str | None = None
    #: The GPU indices given to it on its host.
    gpus: list[int] = []
    #: The job and batch its runner works on (its oldest lease), None when idle.
    job: int | None = None
    batch: int | None = None
    #: Leases it holds, a prefetched batch included.
    leases: int = 0
    batches_done: int = 0
    #: Seconds since the server last heard from it (heartbeat, lease, state change).
    heartbeat_age: float | None = None


class ScalingView(BaseModel):
    """An autoscaled pool's size and why: what `pool status` says of it."""

    min_workers: int
    max_workers: int
    idle_timeout: float
    #: The size its queue asks for now, within min..max.
    target: int
    #: Pending batches of its jobs, counted up to 1,000 or max_workers (``waiting_capped``).
    waiting: int
    waiting_capped: bool = False
    #: Live workers holding a lease, and ready ones holding none.
    busy: int
    idle: int
    #: Why it has (or is moving to) its size now, one line.
    reason: str
    #: Its last scaling step (what it did and why) and when (epoch seconds); None before one.
    last_decision: str | None = None
    decided_at: float | None = None


class PoolView(BaseModel):
    name: str
    status: str
    error: str | None
    #: Its size: ``workers``, or for an autoscaled pool the size its queue asks for now.
    workers: int
    ready: int
    resources: dict[str, Any]
    provider: str
    worker_list: list[WorkerView]
    active_jobs: list[int]
    #: Set for an autoscaled pool (``min_workers``/``max_workers``).
    scaling: ScalingView | None = None
    #: The spec it was applied with (``pool apply --workers N`` without a YAML resizes it).
    spec: dict[str, Any] = {}


class PoolApply(BaseModel):
    spec: dict[str, Any]


class ReduceRequest(BaseModel):
    writer: dict[str, Any]


class ReduceResult(BaseModel):
    rows: int
    missing: list[list[int]]
    path: str


class Register(BaseModel):
    pid: Id


class SetupFailed(BaseModel):
    exit_code: int = Field(ge=-INT64_MAX, le=INT64_MAX)
    output: str


class LeaseRequest(BaseModel):
    prefetch: bool = False
    wait: float = Field(default=defaults.LEASE_WAIT, ge=0, le=60)
    #: Batches wanted at once: an agent whose batches are short asks for several, so
    #: that one request's cost is shared by them (the server may grant fewer).
    max: int = Field(default=1, ge=1, le=defaults.LEASE_MAX_BATCHES)


class CommitRequest(BaseModel):
    """Attempts whose parts are written, committed together in one transaction."""

    attempts: list[Id] = Field(min_length=1, max_length=defaults.LEASE_MAX_BATCHES * 4)
    #: Per attempt, where each writer's part was written (``batches.Place``: its size,
    #: or [segment, offset, size]): parts are not synced, so the reduce checks them.
    sizes: list[list[Annotated[int, Field(ge=0)] | list[Id] | None] | None] | None = None


class Heartbeat(BaseModel):
    attempts: list[Id]


class HealthReport(BaseModel):
    #: What holds the agent's batch of the job back (a full disk); None: nothing now.
    message: str | None = Field(default=None, max_length=4000)


class FailRequest(BaseModel):
    # signal: the runner was killed by a signal it did not send itself (see JobService.fail);
    # input: a line of the batch's input is not a JSON object (the job fails at once).
    kind: str = Field(pattern="^(mapper|system|signal|input)$")
    error: str
    traceback: str | None = None


class LogChunk(BaseModel):
    worker: int
    text: str
    offset: int  # where the next read of this worker's log starts


class LogsView(BaseModel):
    status: str
    chunks: list[LogChunk]
    #: More output is there already: ask again at once (replies are paged).
    more: bool = False

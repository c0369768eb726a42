"""Lifecycles of jobs, batches, workers and pools (see ARCHITECTURE.md)."""

from __future__ import annotations

from enum import Enum

__all__ = ["BatchStatus", "JobStatus", "PoolStatus", "WorkerStatus"]


class JobStatus(str, Enum):
    PENDING = "PENDING"  # submitted; waiting for a worker (indexing may be under way)
    RUNNING = "RUNNING"
    REDUCING = "REDUCING"  # every batch committed; merging parts into the outputs
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)

    def __str__(self) -> str:
        return self.value


class BatchStatus(str, Enum):
    PENDING = "PENDING"
    LEASED = "LEASED"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"


class WorkerStatus(str, Enum):
    STARTING = "STARTING"
    SETTING_UP = "SETTING_UP"
    READY = "READY"
    SETUP_FAILED = "SETUP_FAILED"
    LOST = "LOST"
    STOPPED = "STOPPED"

    @property
    def live(self) -> bool:
        return self in (WorkerStatus.STARTING, WorkerStatus.SETTING_UP, WorkerStatus.READY)


class PoolStatus(str, Enum):
    PROVISIONING = "PROVISIONING"
    READY = "READY"
    DEGRADED = "DEGRADED"  # some workers lost and not (yet) replaced
    FAILED = "FAILED"  # setup failed

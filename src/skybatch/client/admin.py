"""Pools and jobs from Python: what ``skybatch pool ...`` and ``skybatch jobs ...`` call."""

from __future__ import annotations

import os
import time
from typing import Any

from skybatch.client.api import Client
from skybatch.errors import PoolError
from skybatch.pools.spec import check_pool_name, load_pool_file
from skybatch.wire import JobView, PoolView

__all__ = ["cancel", "jobs_queue", "pool_apply", "pool_down", "pool_status", "prune_jobs"]

#: Longest a pool apply waits for its workers' setup.
POOL_READY_TIMEOUT = 3600.0


def pool_apply(yaml_path: str | os.PathLike[str], pool_name: str, wait: bool = True) -> PoolView:
    """Create the pool from its YAML, or bring an existing one to it (resize, restart).

    Blocks until every worker has run its setup, unless ``wait=False``; raises
    :class:`PoolError` with the setup's last output if it fails.
    """
    check_pool_name(pool_name)  # the server checks it too; a URL cannot even carry some
    spec = load_pool_file(yaml_path)
    client = Client.connect()
    view: dict[str, Any] = client.apply_pool(pool_name, spec.model_dump())
    deadline = time.monotonic() + POOL_READY_TIMEOUT
    while wait and view["status"] not in ("READY", "FAILED") and time.monotonic() < deadline:
        view = client.get_pool(pool_name, wait=30)
    if view["status"] == "FAILED":
        raise PoolError(f"pool {pool_name!r}: {view['error']}")
    return PoolView.model_validate(view)


def pool_down(pool_name: str) -> list[str]:
    """Stop the pool's workers and forget it; its running jobs are cancelled. Returns what
    could not be stopped or removed (a host out of reach), one line each."""
    return Client.connect().down_pool(pool_name)


def pool_status(pool_name: str | None = None) -> list[PoolView]:
    client = Client.connect()
    if pool_name is not None:
        return [PoolView.model_validate(client.get_pool(pool_name))]
    return [PoolView.model_validate(p) for p in client.list_pools()]


def jobs_queue() -> list[JobView]:
    """Every job of this deployment, oldest first."""
    return [JobView.model_validate(j) for j in Client.connect().list_jobs()]


def cancel(job_id: str | int) -> None:
    """Stop a job's batches; its pool keeps running for the next job."""
    Client.connect().cancel(str(job_id))


def prune_jobs(older_than_days: float | None = None, keep: int = 0) -> list[int]:
    """Forget finished jobs (succeeded, failed, cancelled): their state, logs and results,
    and the parts a failed or cancelled job kept for a resume. Keeps the ``keep`` newest
    finished jobs and those that finished less than ``older_than_days`` ago; running jobs
    are never touched. Returns the ids of the jobs forgotten.
    """
    return Client.connect().prune(older_than_days, keep)

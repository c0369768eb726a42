"""Pools and jobs from Python: what ``skybatch pool ...`` and ``skybatch jobs ...`` call."""

from __future__ import annotations

import os
import time
from typing import Any

from skybatch.client.api import Client
from skybatch.errors import ConfigError, ConflictError, PoolError
from skybatch.pools.spec import PoolSpec, check_pool_name, load_pool_file, validate_pool_spec
from skybatch.wire import JobView, PoolView

__all__ = [
    "cancel",
    "jobs_queue",
    "pool_apply",
    "pool_down",
    "pool_spec",
    "pool_status",
    "prune_jobs",
]

#: Longest a pool apply waits for its workers' setup.
POOL_READY_TIMEOUT = 3600.0


def pool_spec(
    yaml_path: str | os.PathLike[str] | None, pool_name: str, workers: int | None = None
) -> PoolSpec:
    """The spec ``pool_apply`` sends: the YAML's, or without one the pool's current spec,
    with ``pool.workers`` replaced by ``workers`` when given (a fixed size then)."""
    check_pool_name(pool_name)  # the server checks it too; a URL cannot even carry some
    if yaml_path is not None:
        spec = load_pool_file(yaml_path)
    elif workers is None:
        raise ConfigError(f"give pool {pool_name!r} a YAML file, or --workers N to resize it")
    else:
        current = PoolView.model_validate(Client.connect().get_pool(pool_name)).spec
        if not current:
            raise ConflictError(
                f"the server does not report pool {pool_name!r}'s spec (an older server); "
                "give its YAML file with --workers"
            )
        spec = validate_pool_spec(current, f"pool {pool_name!r}'s current spec")
    if workers is None:
        return spec
    raw = spec.model_dump()
    # An autoscaled pool's bounds would clash with a fixed size: --workers replaces them.
    raw["pool"] = {
        **raw["pool"],
        "workers": workers,
        "min_workers": None,
        "max_workers": None,
        "idle_timeout": None,
    }
    resized = validate_pool_spec(raw, "--workers")
    resized._warnings = spec.warnings  # what the YAML's SkyPilot fields left unused
    return resized


def pool_apply(
    yaml_path: str | os.PathLike[str] | None,
    pool_name: str,
    wait: bool = True,
    workers: int | None = None,
) -> PoolView:
    """Create the pool from its YAML, or bring an existing one to it (resize, restart).

    ``workers`` overrides the YAML's ``pool.workers``; with it the YAML may be left
    out (``None``) to resize the pool as it is. Blocks until every worker has run its
    setup, unless ``wait=False``; raises :class:`PoolError` with the setup's last
    output if it fails.
    """
    return apply_spec(pool_spec(yaml_path, pool_name, workers), pool_name, wait)


def apply_spec(spec: PoolSpec, pool_name: str, wait: bool = True) -> PoolView:
    """``pool_apply`` of a spec already loaded (``pool_spec``)."""
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

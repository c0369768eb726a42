"""Retention: forget finished jobs, so that state.db and SKYBATCH_HOME stop growing."""

from __future__ import annotations

import logging
import math
import shutil

from skybatch.errors import ConfigError
from skybatch.io.registry import reader_from_spec, writer_from_spec
from skybatch.server.context import Context
from skybatch.server.store import JobRecord
from skybatch.states import JobStatus

__all__ = ["prune_jobs"]

log = logging.getLogger("skybatch.server")

DAY = 86400.0


def prune_jobs(ctx: Context, older_than_days: float | None, keep: int) -> list[int]:
    """Forget finished jobs but the ``keep`` newest and those that finished less than
    ``older_than_days`` ago: their rows, logs, server-side files, and the committed
    parts a failed or cancelled job kept for a resume. Running jobs are never touched.
    """
    if older_than_days is not None and not (
        math.isfinite(older_than_days) and older_than_days >= 0
    ):
        raise ConfigError(f"older_than_days must be a number >= 0, got {older_than_days}")
    if keep < 0:
        raise ConfigError(f"keep must be >= 0, got {keep}")
    before = None if older_than_days is None else ctx.clock() - older_than_days * DAY
    pruned = ctx.store.prune_jobs(before, keep)
    for job in pruned:
        _remove_files(ctx, job)
    if pruned:
        log.info("pruned %d finished job(s)", len(pruned))
    return [job.id for job in pruned]


def _remove_files(ctx: Context, job: JobRecord) -> None:
    shutil.rmtree(ctx.home.root / "jobs" / str(job.id), ignore_errors=True)
    shutil.rmtree(ctx.home.job_log(job.id, 0).parent, ignore_errors=True)
    if job.status is JobStatus.SUCCEEDED:
        return  # its staging area went when it published
    # Best effort: nothing could recover these parts once the job is forgotten.
    try:
        reader_from_spec(job.spec["reader"]).cleanup()
    except Exception as e:
        log.warning("cleanup of pruned job %d's input failed: %s", job.id, e)
    for spec in job.spec.get("writers", []):
        try:
            writer_from_spec(spec).cleanup(job.id)
        except Exception as e:
            log.warning("cleanup of pruned job %d's output failed: %s", job.id, e)

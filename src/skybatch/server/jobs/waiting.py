"""Waits on a job for its followers: a change past the version they saw, or the end of
its finishing (its staging area removed), so what they read next is settled."""

from __future__ import annotations

import time

from skybatch.server.jobs.runtime import Runtime
from skybatch.server.store import JobRecord

__all__ = ["Waiting"]


class Waiting:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.ctx = rt.ctx

    async def wait(self, job_id: int, version: int, timeout: float) -> JobRecord:
        """The job once it differs from ``version`` or ends, or as it is at ``timeout``."""
        deadline = time.monotonic() + timeout
        job = self.rt.get(job_id)
        while job_id in self.rt.finishing and time.monotonic() < deadline:
            await self.ctx.notifier.wait(("job", job_id), deadline - time.monotonic())
            job = self.rt.get(job_id)
        if job.version != version or job.status.finished:
            return job
        await self.ctx.notifier.wait(("job", job_id), max(0.0, deadline - time.monotonic()))
        return self.rt.get(job_id)

    async def settled(self, job_id: int) -> JobRecord:
        """The job as its owner may act on it: one whose final status is recorded but
        whose staging area is still being removed (moments) is answered after that."""
        deadline = time.monotonic() + 30
        while job_id in self.rt.finishing and time.monotonic() < deadline:
            await self.ctx.notifier.wait(("job", job_id), deadline - time.monotonic())
        return self.rt.get(job_id)

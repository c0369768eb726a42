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

    async def wait(
        self, job_id: int, version: int, timeout: float, interval: float = 0.0
    ) -> JobRecord:
        """The job once it differs from ``version`` or ends, or as it is at ``timeout``.

        A change is answered no sooner than ``interval`` after the request came in
        (the changes meanwhile ride along), the job's end at once: a follower that
        wants ten updates a second need not sleep between requests and so miss the end
        by up to a tenth of a second.
        """
        now = time.monotonic()
        deadline = now + timeout
        quiet_until = min(now + interval, deadline)
        woken = False  # a wake-up without a new version (a health line) is news too
        while True:
            job = self.rt.get(job_id)
            now = time.monotonic()
            settled = job_id not in self.rt.finishing
            changed = woken or job.version != version
            if (
                now >= deadline
                or self.ctx.notifier.closed
                or (settled and (job.status.finished or (changed and now >= quiet_until)))
            ):
                return job
            until = quiet_until if settled and changed else deadline
            await self.ctx.notifier.wait(("job", job_id), until - now)
            woken = True

    async def settled(self, job_id: int) -> JobRecord:
        """The job as its owner may act on it: one whose final status is recorded but
        whose staging area is still being removed (moments) is answered after that."""
        deadline = time.monotonic() + 30
        while job_id in self.rt.finishing and time.monotonic() < deadline:
            await self.ctx.notifier.wait(("job", job_id), deadline - time.monotonic())
        return self.rt.get(job_id)

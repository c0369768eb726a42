"""The lease long poll: a worker's request takes the next ready batch of its pool, or
sleeps on the pool's notifier until a job, a retry or a requeue wakes it."""

from __future__ import annotations

from skybatch import defaults
from skybatch.errors import ConflictError
from skybatch.server.context import Context
from skybatch.server.store import Lease

__all__ = ["Leasing"]


class Leasing:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def lease(self, worker_id: int, pool: str, prefetch: bool, wait: float) -> Lease | None:
        store, key = self.ctx.store, ("pool", pool)
        deadline = self.ctx.clock() + wait
        while True:
            # A prefetch must not take a batch that an idle worker is waiting for.
            if prefetch and self.ctx.notifier.waiting(key):
                return None
            now = self.ctx.clock()
            lease = store.lease(pool, worker_id, now, defaults.LEASE_TTL)
            if lease is not None:
                self.ctx.notifier.notify(("job", lease.job_id))
                return lease
            if prefetch:
                return None
            timeout = deadline - now
            ready_at = store.next_ready_at(pool, now)
            if ready_at is not None:
                timeout = min(timeout, ready_at - now + 0.001)
            if timeout <= 0 or self.ctx.notifier.closed:
                return None
            await self.ctx.notifier.wait(key, timeout)
            # The route checked the worker; a long wait may have outlived it.
            worker = store.get_worker(worker_id)
            if worker is None or not worker.status.live:
                raise ConflictError(f"worker {worker_id} is not part of a live pool; exit")

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
        leases = await self.lease_many(worker_id, pool, prefetch, wait, 1)
        return leases[0] if leases else None

    async def lease_many(
        self, worker_id: int, pool: str, prefetch: bool, wait: float, limit: int
    ) -> list[Lease]:
        """Up to ``limit`` batches of one job (``LeaseStore.lease_many``), waiting up to
        ``wait`` seconds for the first."""
        store, key = self.ctx.store, ("pool", pool)
        deadline = self.ctx.clock() + wait
        while True:
            # A prefetch must not take a batch that an idle worker is waiting for.
            if prefetch and self.ctx.notifier.waiting(key):
                return []
            now = self.ctx.clock()
            leases = store.lease_many(pool, worker_id, now, defaults.LEASE_TTL, limit)
            if leases:
                self.ctx.notifier.notify(("job", leases[0].job_id))
                return leases
            if prefetch:
                return []
            timeout = deadline - now
            ready_at = store.next_ready_at(pool, now)
            if ready_at is not None:
                timeout = min(timeout, ready_at - now + 0.001)
            if timeout <= 0 or self.ctx.notifier.closed:
                return []
            await self.ctx.notifier.wait(key, timeout)
            # The route checked the worker; a long wait may have outlived it.
            worker = store.get_worker(worker_id)
            if worker is None or not worker.status.live:
                raise ConflictError(f"worker {worker_id} is not part of a live pool; exit")

"""The autoscaling decision: a pool's queue and workers in, its target size and why out.

Pure, like ``scheduler.py``: the pool service reads the state (``ScalingStore.pool_load``)
and acts on the decision; the store alone makes a stop safe (it marks a worker stopped
only in the transaction that finds it holds no lease), so a decision made on a moment-old
reading can be late, never wrong.

The rule: every batch that waits or runs wants a worker, and a job still being indexed
wants one even before its first batch, so a job on a pool of 0 makes it grow. The
pool grows to that (within min..max) at once, counting workers still starting; it
shrinks only by ready workers that have held no lease for ``idle_timeout`` seconds,
the longest idle first, down to what the queue wants but never under min.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from skybatch.server.store import WorkerLoad
from skybatch.states import WorkerStatus

__all__ = ["Decision", "decide"]


@dataclass(frozen=True)
class Decision:
    #: The size the queue asks for, within min..max.
    target: int
    #: How many workers to start now.
    launch: int
    #: Ids of idle workers to stop now (the store stops each only if it still holds no lease).
    stop: list[int] = field(default_factory=list)
    #: Why the pool has (or is moving to) its size: one line for `pool status`.
    reason: str = ""
    live: int = 0
    busy: int = 0
    idle: int = 0
    waiting: int = 0
    waiting_capped: bool = False

    @property
    def changes(self) -> bool:
        return bool(self.launch or self.stop)


def _batches(n: int, capped: bool) -> str:
    return f"{n}{'+' if capped else ''} batch{'' if n == 1 and not capped else 'es'}"


def decide(
    *,
    low: int,
    high: int,
    idle_timeout: float,
    waiting: int,
    waiting_capped: bool = False,
    jobs: int,
    workers: Sequence[WorkerLoad],
    now: float,
) -> Decision:
    """What an autoscaled pool should do now.

    ``waiting``: its pending batches (counted up to a cap: ``waiting_capped``);
    ``jobs``: its jobs still pending or running; ``workers``: its live workers.
    """
    live = [w for w in workers if w.status.live]
    busy = [w for w in live if w.leases > 0]
    idle = [w for w in live if w.leases == 0 and w.status is WorkerStatus.READY]
    demand = len(busy) + waiting
    if jobs > 0:
        demand = max(demand, 1)
    target = min(max(demand, low), high)

    def made(launch: int, reason: str, stop: list[int] | None = None) -> Decision:
        return Decision(
            target,
            launch,
            stop or [],
            reason,
            len(live),
            len(busy),
            len(idle),
            waiting,
            waiting_capped,
        )

    if waiting or busy:
        queue = f"{_batches(waiting, waiting_capped)} waiting, {len(busy)} busy"
    elif jobs:
        queue = f"{jobs} job{'s' if jobs > 1 else ''} with no batch waiting yet"
    else:
        queue = "no batches waiting"
    # Where the queue asks for more, or less, than the pool's bounds allow.
    bound = " (min_workers)" if target == low and demand < low else ""
    bound = " (max_workers)" if target == high and demand > high else bound
    if target > len(live):
        return made(target - len(live), f"scaling up from {len(live)} to {target}{bound}: {queue}")
    if target < len(live):
        expired = sorted(
            (w for w in idle if w.idle_since is not None and now - w.idle_since >= idle_timeout),
            key=lambda w: (w.idle_since or 0.0, -w.index),
        )
        stop = [w.id for w in expired[: len(live) - target]]
        if stop:
            return made(
                0,
                f"scaling down from {len(live)} to {len(live) - len(stop)}: {queue}, "
                f"{len(stop)} idle for {idle_timeout:g}s or more",
                stop,
            )
        return made(
            0,
            f"{len(live)} workers, {target} wanted: {queue}, {len(idle)} idle "
            f"(a worker stops after {idle_timeout:g}s idle)",
        )
    return made(0, f"{target} worker{'s' if target != 1 else ''}{bound}: {queue}")

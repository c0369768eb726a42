"""Wake-ups for long polls: lease requests wait per pool, clients wait per job."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Hashable

__all__ = ["Notifier"]


class Notifier:
    """``await wait(key, timeout)`` returns early when someone calls ``notify(key)``.

    Lives on the event loop; other threads use ``notify_threadsafe``.
    """

    def __init__(self) -> None:
        self._waiters: dict[Hashable, set[asyncio.Future[None]]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def wait(self, key: Hashable, timeout: float) -> None:
        if self.closed:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters[key]
        waiters.add(fut)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(fut, timeout)
        finally:
            waiters.discard(fut)
            # notify() may have replaced this set with a newer one: never drop that.
            if not waiters and self._waiters.get(key) is waiters:
                del self._waiters[key]

    def waiting(self, key: Hashable) -> int:
        return len(self._waiters.get(key, ()))

    def notify(self, key: Hashable) -> None:
        for fut in self._waiters.pop(key, set()):
            if not fut.done():
                fut.set_result(None)

    def notify_threadsafe(self, key: Hashable) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.notify, key)

    def close(self) -> None:
        """The server is stopping: end every wait now, and all later ones at once."""
        self.closed = True
        for key in list(self._waiters):
            self.notify(key)

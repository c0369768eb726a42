"""What every server service shares: the deployment, the store, the wake-ups, the clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from skybatch.config import Home
from skybatch.server.events import Notifier
from skybatch.server.store import Store

__all__ = ["Context"]


@dataclass
class Context:
    home: Home
    store: Store
    token: str
    url: str
    #: PEM of the TLS certificate when the server serves HTTPS (agents pin it).
    cert: str | None = None
    notifier: Notifier = field(default_factory=Notifier)
    clock: Callable[[], float] = time.time

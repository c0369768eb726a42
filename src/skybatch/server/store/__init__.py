"""The state store: pools, workers, jobs, batches and attempts.

``base.py`` holds the interfaces, one per concern, and :class:`Store`, their
union; ``claims.py`` how outputs are claimed; ``sql.py`` every statement, once;
``sqlite.py`` the file store the server runs on; ``memory.py`` the same in memory.
"""

from __future__ import annotations

from skybatch.server.store.base import (
    AttemptRecord,
    BatchStore,
    JobRecord,
    JobStore,
    Lease,
    LeaseStore,
    Maintenance,
    PoisonStore,
    PoolLoad,
    PoolRecord,
    PoolStore,
    ScalingStore,
    Store,
    WorkerLoad,
    WorkerRecord,
    WorkerStore,
)
from skybatch.server.store.claims import OutputClaimed, claimed_outputs, output_key, overlap
from skybatch.server.store.memory import MemoryStore
from skybatch.server.store.sqlite import SqliteStore

__all__ = [
    "AttemptRecord",
    "BatchStore",
    "JobRecord",
    "JobStore",
    "Lease",
    "LeaseStore",
    "Maintenance",
    "MemoryStore",
    "OutputClaimed",
    "PoisonStore",
    "PoolLoad",
    "PoolRecord",
    "PoolStore",
    "ScalingStore",
    "SqliteStore",
    "Store",
    "WorkerLoad",
    "WorkerRecord",
    "WorkerStore",
    "claimed_outputs",
    "output_key",
    "overlap",
]

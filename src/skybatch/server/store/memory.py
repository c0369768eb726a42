"""A store in memory, for unit tests of the services above it, in milliseconds.

It is SQLite's ``:memory:`` database through the same SQL as the file store
(``sql.py``), not a second implementation in dicts: the two cannot drift, and
the contract suite (``tests/contract/test_store.py``) runs on both. It has no
file to watch and is gone when closed.
"""

from __future__ import annotations

from skybatch.server.store.sqlite import SqliteDatabase, connect

__all__ = ["MemoryStore"]


class MemoryStore(SqliteDatabase):
    """Every store method, its state in this process's memory."""

    def __init__(self) -> None:
        super().__init__(connect(":memory:"), ":memory:")

"""`skybatch pool status NAME`'s worker table: one row per worker, every column."""

from __future__ import annotations

from skybatch.cli import worker_table
from skybatch.wire import WorkerView


def test_worker_rows_show_place_gpus_work_and_heartbeat() -> None:
    workers = [
        WorkerView(
            id=7,
            index=0,
            status="READY",
            pid=4242,
            error=None,
            provider="local",
            host="localhost",
            gpus=[0, 1],
            job=3,
            batch=17,
            leases=2,
            batches_done=40,
            heartbeat_age=1.6,
        ),
        WorkerView(
            id=8,
            index=1,
            status="READY",
            pid=4243,
            error=None,
            provider="ssh",
            host="gpu-a",
            gpus=[],
            batches_done=0,
            heartbeat_age=75,
        ),
        # An older server's answer: none of the new fields.
        WorkerView(id=9, index=2, status="STARTING", pid=None, error=None),
    ]
    assert worker_table(workers).splitlines() == [
        "WORKER  STATUS    PID   PROVIDER  HOST       GPUS  JOB  BATCH  DONE  HEARTBEAT",
        "0       READY     4242  local     localhost  0,1   3    17 +1  40    1s ago",
        "1       READY     4243  ssh       gpu-a      -     -    -      0     1m 15s ago",
        "2       STARTING  -     -         -          -     -    -      0     -",
    ]

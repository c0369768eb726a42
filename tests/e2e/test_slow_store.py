"""Store work that takes long (a big job's parts, writing state.db back) never stalls
the server: ``/v1/health`` keeps answering while it runs."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from skybatch.batches import BatchPlan
from skybatch.config import Home
from skybatch.io.formats.jsonl import JsonWriter
from skybatch.server.store import SqliteStore
from skybatch.states import JobStatus
from tests.helpers import deployment_at, server, wait_for

#: A job's batches, all committed: reading its parts takes most of a second.
BATCHES = 300_000
#: Poison rows of 1 MiB each: a state.db of about 330 MB, written back in a second or more.
POISON_ROWS = 320


def _big_state(home: Home, out: Path) -> int:
    """A finished job with many committed batches and a large state.db, made through
    the store before the server starts; the job's id."""
    store = SqliteStore(home.db)
    spec = {"max_retries": 0, "retry_backoff": 0.0, "writers": [JsonWriter(str(out)).to_spec()]}
    job = store.create_job("big", "none", spec, now=0)
    store.add_batches(job, [BatchPlan(i, 0, i, i + 1, i, 1, i) for i in range(BATCHES)], done=True)
    blob = "x" * (1 << 20)
    for row in range(POISON_ROWS):
        store.poison_batch(job, row, row, blob, "poison", None)
    store.set_job_status(job, JobStatus.RUNNING, now=0)
    store.set_job_status(job, JobStatus.CANCELLED, now=1)
    store.close()
    # No store method commits a batch without a lease for it: mark them so directly.
    db = sqlite3.connect(home.db)
    with db:
        db.execute(
            "UPDATE batches SET status='COMMITTED', committed_attempt=1 WHERE job_id=?", (job,)
        )
    db.close()
    return job


def _worst_lag(client: httpx.Client, busy: Callable[[], bool]) -> float:
    """The slowest /v1/health round trip while ``busy()`` holds."""
    worst = 0.0
    while busy():
        start = time.monotonic()
        assert client.get("/v1/health").status_code == 200
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.02)
    return worst


def test_long_store_work_leaves_the_loop_free(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    out = tmp_path / "out.jsonl"
    job = _big_state(home, out)
    with deployment_at(home.root) as d:
        d.cli("jobs", "queue")  # starts the server on that state
        url, headers, _ = server(d)
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            # reduce_results of the big job reads its 300,000 parts (then finds none on disk).
            reduce = threading.Thread(
                target=httpx.post,
                args=(f"{url}/v1/jobs/{job}/reduce",),
                kwargs={
                    "headers": headers,
                    "json": {"writer": JsonWriter(str(out)).to_spec()},
                    "timeout": 60,
                },
            )
            reduce.start()
            worst = _worst_lag(client, reduce.is_alive)
            reduce.join()
            assert worst < 0.3, f"/v1/health took {worst:.2f}s while a job's parts were read"

            # state.db deleted: the monitor writes the open database back (330 MB).
            size = home.db.stat().st_size
            home.db.unlink()
            deadline = time.monotonic() + 10
            worst = _worst_lag(
                client,
                lambda: (
                    time.monotonic() < deadline
                    and not (home.db.exists() and home.db.stat().st_size >= size)
                ),
            )
            assert worst < 0.3, f"/v1/health took {worst:.2f}s while state.db was written back"
            wait_for(lambda: [j["id"] for j in client.get("/v1/jobs").json()] == [job])
    for path in home.root.glob("state.db*"):  # hundreds of MB, not kept with tmp_path
        path.unlink()

"""The job service on the in-memory store: lease, commit, fail, retry, bisection, resume.

A real ``JobService`` over :class:`MemoryStore`, with a fake clock: the test plays
the agents (it leases, reads a batch's rows, writes a part, commits or fails), so no
process starts and no backoff is slept through. Inputs are small local JSONL files.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec

import orjson
import pytest

from skybatch import defaults
from skybatch.config import Home
from skybatch.errors import ConflictError
from skybatch.io.formats.jsonl import JsonReader, JsonWriter
from skybatch.io.registry import reader_from_spec, writer_from_spec
from skybatch.server.context import Context
from skybatch.server.jobs import JobService
from skybatch.server.store import JobRecord, Lease, MemoryStore
from skybatch.states import JobStatus, WorkerStatus
from skybatch.wire import JobSubmit, MapperSpec
from tests.helpers import read_jsonl, write_jsonl

POOL = "p"
START = 1_000.0

P = ParamSpec("P")


@dataclass
class Clock:
    """The server's time, moved by the test: backoffs and lease expiry without sleeping."""

    now: float = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Harness:
    """One server's job service, and the test as its pool's agents."""

    tmp: Path
    store: MemoryStore
    clock: Clock
    svc: JobService
    workers: list[int] = field(default_factory=list)

    def submit_request(
        self, rows: list[dict[str, Any]], out: str = "out.jsonl", **options: Any
    ) -> JobSubmit:
        source = write_jsonl(self.tmp / f"in-{len(rows)}-{time.monotonic_ns()}.jsonl", rows)
        errors = options.pop("errors", None)
        options.setdefault("batch_size", 2)
        return JobSubmit(
            name="j",
            pool=POOL,
            reader=JsonReader(str(source)).to_spec(),
            writers=[JsonWriter(str(self.tmp / out)).to_spec()],
            mapper=MapperSpec(name="double", source="", filename="double.py"),
            errors=JsonWriter(str(self.tmp / errors)).to_spec() if errors else None,
            **options,
        )

    async def submit(self, rows: list[dict[str, Any]], **options: Any) -> int:
        """Submit a job and wait for its indexing thread to record every batch."""
        job = await self.svc.submit(self.submit_request(rows, **options))
        await until(lambda: self.svc.get(job.id).indexed)
        return job.id

    async def lease(self, worker: int = 0) -> Lease | None:
        """One lease request that does not wait: a batch, or None."""
        return await self.svc.lease(self.workers[worker], POOL, prefetch=False, wait=0)

    async def must_lease(self, worker: int = 0) -> Lease:
        lease = await self.lease(worker)
        assert lease is not None, f"no batch for worker {worker} at t={self.clock.now}"
        return lease

    def rows(self, lease: Lease) -> list[dict[str, Any]]:
        reader = reader_from_spec(self.svc.get(lease.job_id).spec["reader"])
        return [orjson.loads(line) for line in reader.read(lease.batch).splitlines() if line]

    async def run(self, lease: Lease) -> None:
        """The agent's way with a batch: map its rows, write its part, commit it."""
        out = b"".join(orjson.dumps({**r, "y": r["x"] * 2}) + b"\n" for r in self.rows(lease))
        for spec in self.svc.get(lease.job_id).spec["writers"]:
            writer_from_spec(spec).write_part(lease.job_id, lease.batch.index, lease.attempt, out)
        await self.svc.commit(lease.attempt)

    async def fail(self, lease: Lease, kind: str = "mapper", error: str = "boom") -> None:
        await self.svc.fail(lease.attempt, kind, error, f"Traceback: {error}")

    async def drain(self, job_id: int, poison: str = "poison") -> JobRecord:
        """Run the job to its end: batches holding a ``poison`` row fail, the rest
        commit; a backoff is skipped by moving the clock."""
        for _ in range(200):
            job = self.svc.get(job_id)
            if job.status.finished or job.status is JobStatus.REDUCING:
                break
            lease = await self.lease()
            if lease is None:
                self.clock.advance(3600)
                await asyncio.sleep(0.001)  # let spawned reduces and indexing move
                continue
            if any(r.get(poison) for r in self.rows(lease)):
                await self.fail(lease, error=f"row {lease.batch.row_start} is poison")
            else:
                await self.run(lease)
        return await self.finished(job_id)

    async def finished(self, job_id: int) -> JobRecord:
        await until(lambda: self.svc.get(job_id).status.finished)
        return await self.svc.settled(job_id)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll what a thread or a spawned task brings about (indexing, a reduce)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    home = Home(tmp_path / "home")
    home.root.mkdir()
    store = MemoryStore()
    clock = Clock()
    ctx = Context(home=home, store=store, token="t", url="http://127.0.0.1:1", clock=clock)
    harness = Harness(tmp_path, store, clock, JobService(ctx))
    # Registered through the store, as the pool service does once agents say they are ready.
    store.put_pool(POOL, {"pool": {"workers": 2}}, now=START)
    for index in range(2):
        worker = store.add_worker(POOL, index, now=START)
        store.set_worker(worker, status=WorkerStatus.READY, now=START)
        harness.workers.append(worker)
    yield harness
    store.close()


def on_loop(scenario: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test (its fixture ``h``, any parameters) on a fresh event loop, the
    notifier bound to it as the server's lifespan binds it."""

    @functools.wraps(scenario)
    def test(*args: P.args, **kwargs: P.kwargs) -> None:
        h = kwargs["h"]
        assert isinstance(h, Harness)

        async def main() -> None:
            h.svc.ctx.notifier.bind(asyncio.get_running_loop())
            try:
                await scenario(*args, **kwargs)
            finally:
                h.svc.stop_indexing()

        asyncio.run(main())

    return test


def numbered(n: int, poison: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """Rows ``{"x": i}``; those in ``poison`` fail every batch they are in."""
    return [{"x": i, **({"poison": True} if i in poison else {})} for i in range(n)]


@on_loop
async def test_submit_indexes_then_leases_each_batch_once_in_order(h: Harness) -> None:
    job_id = await h.submit(numbered(5))
    job = h.svc.get(job_id)
    assert (job.status, job.total_batches, job.total_rows) == (JobStatus.PENDING, 3, 5)
    leases = [await h.must_lease(w) for w in (0, 1, 0)]
    assert [(a.batch.index, a.batch.row_start, a.batch.row_count) for a in leases] == [
        (0, 0, 2),
        (1, 2, 2),
        (2, 4, 1),
    ]
    assert len({a.attempt for a in leases}) == 3
    assert all(a.expires_at == START + defaults.LEASE_TTL for a in leases)
    assert await h.lease(1) is None, "every batch is leased: none is leased twice"
    assert h.svc.get(job_id).status is JobStatus.RUNNING


@on_loop
async def test_commits_reduce_into_the_output_and_a_repeated_commit_is_accepted(
    h: Harness,
) -> None:
    job_id = await h.submit(numbered(5))
    leases = [await h.must_lease() for _ in range(3)]
    await h.run(leases[1])
    await h.svc.commit(leases[1].attempt)  # the agent's retry of a commit whose answer was lost
    job = h.svc.get(job_id)
    assert (job.committed_batches, job.committed_rows) == (1, 2)
    for lease in (leases[2], leases[0]):
        await h.run(lease)
    job = await h.finished(job_id)
    assert job.status is JobStatus.SUCCEEDED and job.committed_rows == 5
    assert read_jsonl(h.tmp / "out.jsonl") == [{"x": i, "y": 2 * i} for i in range(5)]
    staging = writer_from_spec(job.spec["writers"][0]).staging_root(job_id)
    assert not Path(staging).exists(), "the parts go once the output is published"


@on_loop
async def test_an_attempt_that_lost_its_lease_can_neither_commit_nor_fail(h: Harness) -> None:
    job_id = await h.submit(numbered(2))
    zombie = await h.must_lease(0)
    h.clock.advance(defaults.LEASE_TTL + 1)
    pools, exhausted = h.store.expire_leases(h.clock(), defaults.MAX_SYSTEM_FAILURES)
    assert (pools, exhausted) == ({POOL}, [])
    fresh = await h.must_lease(1)
    assert fresh.batch.index == zombie.batch.index and fresh.attempt != zombie.attempt
    with pytest.raises(ConflictError, match="no longer holds its lease"):
        await h.run(zombie)
    with pytest.raises(ConflictError, match="no longer holds its lease"):
        await h.fail(zombie)
    await h.run(fresh)
    job = await h.finished(job_id)
    assert job.status is JobStatus.SUCCEEDED
    assert [(p.batch, p.attempt) for p in h.store.committed_parts(job_id)] == [(0, fresh.attempt)]


@pytest.mark.parametrize(
    ("backoff", "waits"),
    [
        (10.0, [10.0, 20.0]),  # the backoff doubles with each try
        (0.5, [0.5, 1.0]),
    ],
)
@on_loop
async def test_a_failed_batch_waits_out_its_backoff_on_the_clock(
    h: Harness, backoff: float, waits: list[float]
) -> None:
    await h.submit(numbered(1), max_retries=len(waits), retry_backoff=backoff)
    lease = await h.must_lease()
    for wait in waits:
        await h.fail(lease)
        failed_at = h.clock()
        assert h.store.next_ready_at(POOL, failed_at) == failed_at + wait
        h.clock.advance(wait - 0.01)
        assert await h.lease() is None, f"leased {wait - 0.01}s into a {wait}s backoff"
        h.clock.advance(0.01)
        retry = await h.must_lease()
        assert retry.batch.index == lease.batch.index and retry.attempt != lease.attempt
        lease = retry
    await h.run(lease)
    assert (await h.finished(lease.job_id)).status is JobStatus.SUCCEEDED


@on_loop
async def test_retries_exhausted_fail_the_job_naming_batch_rows_and_tries(h: Harness) -> None:
    job_id = await h.submit(numbered(5), max_retries=1, retry_backoff=1.0)
    first, second, third = [await h.must_lease() for _ in range(3)]
    await h.run(first)
    await h.run(third)
    await h.fail(second, error="first boom")
    h.clock.advance(1)
    await h.fail(await h.must_lease(), error="last boom")
    job = await h.finished(job_id)
    assert job.status is JobStatus.FAILED
    assert job.error is not None
    assert job.error.startswith(
        f"job {job_id} (j) failed: batch 1 (rows 2-3) failed 2 times (max_retries=1)."
    )
    assert "First failure (try 1, worker 0):\nTraceback: first boom" in job.error
    assert "Last failure (try 2, worker 0):\nTraceback: last boom" in job.error
    assert "2 of 3 batches (3 of 5 rows) committed and kept" in job.error
    assert await h.lease() is None


@on_loop
async def test_max_failed_rows_bisects_down_to_the_poison_row(h: Harness) -> None:
    rows = numbered(8, poison=(5,))
    job_id = await h.submit(
        rows, batch_size=4, max_retries=0, max_failed_rows=1, errors="errors.jsonl"
    )
    job = await h.drain(job_id)
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert (job.failed_rows, job.committed_rows) == (1, 7)
    assert read_jsonl(h.tmp / "out.jsonl") == [
        {**r, "y": 2 * r["x"]} for r in rows if not r.get("poison")
    ]
    [error] = read_jsonl(h.tmp / "errors.jsonl")
    assert error == {
        "row": 5,
        "input": {"x": 5, "poison": True},
        "error": "row 5 is poison",
        "traceback": "Traceback: row 5 is poison",
    }


@on_loop
async def test_more_poison_rows_than_max_failed_rows_fail_the_job(h: Harness) -> None:
    rows = numbered(4, poison=(1, 2))
    job_id = await h.submit(rows, batch_size=4, max_retries=0, max_failed_rows=1)
    job = await h.drain(job_id)
    assert job.status is JobStatus.FAILED
    assert job.error is not None and "more than max_failed_rows=1 rows failed" in job.error


@pytest.mark.parametrize(
    ("kinds", "ends"),
    [
        (["signal"], False),  # the first death by a signal is free
        (["signal", "signal"], True),  # the second costs the only try
        (["system"], False),  # a lost worker's batch is retried at once
        (["mapper"], True),
    ],
)
@on_loop
async def test_which_deaths_cost_a_try(h: Harness, kinds: list[str], ends: bool) -> None:
    job_id = await h.submit(numbered(1), max_retries=0, retry_backoff=60.0)
    for kind in kinds:
        await h.fail(await h.must_lease(), kind=kind, error=f"killed ({kind})")
    job = h.svc.get(job_id)
    if ends:
        job = await h.finished(job_id)
        assert job.status is JobStatus.FAILED and job.error is not None
        free = "; the first death by a signal is free" if "signal" in kinds else ""
        assert f"failed {len(kinds)} times (max_retries=0{free})." in job.error
    else:
        assert job.status is JobStatus.RUNNING and job.retries == 0
        await h.run(await h.must_lease())  # at once: no backoff for a free death
        assert (await h.finished(job_id)).status is JobStatus.SUCCEEDED


@on_loop
async def test_cancel_revokes_the_leases(h: Harness) -> None:
    job_id = await h.submit(numbered(4))
    held = await h.must_lease(0)
    job = await h.svc.cancel(job_id)
    assert job.status is JobStatus.CANCELLED
    revoked = h.store.heartbeat(h.workers[0], [held.attempt], h.clock(), defaults.LEASE_TTL)
    assert revoked == [held.attempt], "the agent's heartbeat learns its lease is gone"
    with pytest.raises(ConflictError):
        await h.run(held)
    assert await h.lease(1) is None
    with pytest.raises(ConflictError, match="already CANCELLED"):
        await h.svc.cancel(job_id)


@on_loop
async def test_resume_runs_only_the_missing_batches_with_fresh_retries(h: Harness) -> None:
    job_id = await h.submit(numbered(6), max_retries=1, retry_backoff=1.0)
    first, second, third = [await h.must_lease() for _ in range(3)]
    await h.run(first)
    await h.run(third)
    await h.fail(second)
    h.clock.advance(1)
    await h.fail(await h.must_lease())  # its last try: the job fails
    assert (await h.finished(job_id)).status is JobStatus.FAILED
    resumed = await h.svc.resume(job_id, None)
    assert resumed.status is JobStatus.PENDING and resumed.committed_batches == 2
    again = await h.must_lease()
    assert again.batch.index == 1 and again.generation == first.generation + 1
    assert await h.lease(1) is None, "committed batches are not run again"
    await h.fail(again)  # had its retries not been renewed, this would end the job
    assert h.svc.get(job_id).status is JobStatus.RUNNING
    h.clock.advance(1)
    await h.run(await h.must_lease())
    job = await h.finished(job_id)
    assert job.status is JobStatus.SUCCEEDED
    assert read_jsonl(h.tmp / "out.jsonl") == [{"x": i, "y": 2 * i} for i in range(6)]


@on_loop
async def test_an_output_is_claimed_by_one_unfinished_job(h: Harness) -> None:
    owner = await h.submit(numbered(2))
    with pytest.raises(ConflictError, match=f"skybatch jobs cancel {owner}"):
        await h.svc.submit(h.submit_request(numbered(3)))
    assert [j.id for j in h.store.list_jobs()] == [owner], "a refused submit leaves no job"
    await h.svc.cancel(owner)
    await h.submit(numbered(3))  # a finished job's claim is gone


@on_loop
async def test_a_follower_gets_a_change_after_its_interval_and_the_end_at_once(
    h: Harness,
) -> None:
    job_id = await h.submit(numbered(4))
    first, second = await h.must_lease(), await h.must_lease()
    seen = h.svc.get(job_id).version
    bar = asyncio.create_task(h.svc.wait(job_id, seen, timeout=30, interval=0.2))
    end_only = asyncio.create_task(h.svc.wait(job_id, seen, timeout=30, interval=30))
    await h.run(first)
    await asyncio.sleep(0.05)
    assert not bar.done(), "a change is held back until the interval has passed"
    job = await asyncio.wait_for(bar, 5)
    assert job.committed_batches == 1 and not job.status.finished
    assert not end_only.done()
    await h.run(second)
    job = await asyncio.wait_for(end_only, 5)  # not its 30 s: the end is answered at once
    assert job.status is JobStatus.SUCCEEDED
    assert not (h.tmp / ".skybatch").exists(), "answered once its staging area is gone"
    assert read_jsonl(h.tmp / "out.jsonl") == [{"x": i, "y": 2 * i} for i in range(4)]

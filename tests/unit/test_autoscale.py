"""Autoscaling: the pool YAML's min/max fields and the pure decision (queue and workers
in, target and reason out)."""

from __future__ import annotations

import pytest

from skybatch.errors import PoolSpecError
from skybatch.pools.spec import parse_pool_spec, validate_pool_spec
from skybatch.server.autoscale import decide
from skybatch.server.store import WorkerLoad
from skybatch.states import WorkerStatus

READY, STARTING = WorkerStatus.READY, WorkerStatus.STARTING

# -- the YAML --------------------------------------------------------------------------


def test_min_max_and_idle_timeout() -> None:
    spec = parse_pool_spec("pool:\n  min_workers: 1\n  max_workers: 4\n  idle_timeout: 2\n")
    assert (spec.autoscaled, spec.min_workers, spec.workers, spec.pool.idle_after) == (
        True,
        1,
        4,
        2.0,
    )
    assert spec.size_text() == "1-4"
    # What the client sends is what the server validates again.
    assert validate_pool_spec(spec.model_dump()) == spec


def test_defaults_and_the_fixed_form() -> None:
    spec = parse_pool_spec("pool: {max_workers: 3}\n")
    assert (spec.min_workers, spec.workers, spec.pool.idle_after) == (0, 3, 60.0)
    fixed = parse_pool_spec("pool: {workers: 2}\n")
    assert (fixed.autoscaled, fixed.min_workers, fixed.workers, fixed.size_text()) == (
        False,
        2,
        2,
        "2",
    )
    # A pool stored before autoscaling existed reads the same.
    assert validate_pool_spec({"pool": {"workers": 2}}).workers == 2


HINT = "give pool.workers (a fixed size) or pool.min_workers/max_workers (autoscaling)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pool: {}\n", f"pool.yaml line 1: pool: no size: {HINT}"),
        (
            "pool:\n  workers: 2\n  max_workers: 4\n",
            f"pool.yaml line 3: pool.max_workers: not with pool.workers: {HINT}, not both",
        ),
        (
            "pool:\n  workers: 2\n  min_workers: 1\n",
            f"pool.yaml line 3: pool.min_workers: not with pool.workers: {HINT}, not both",
        ),
        (
            "pool:\n  min_workers: 1\n",
            "pool.yaml line 1: pool.max_workers: missing: an autoscaled pool needs "
            "pool.max_workers",
        ),
        (
            "pool:\n  min_workers: 5\n  max_workers: 4\n",
            "pool.yaml line 3: pool.max_workers: 4 is less than pool.min_workers (5); "
            "make max_workers at least min_workers",
        ),
        (
            "pool:\n  max_workers: 0\n",
            "pool.yaml line 2: pool.max_workers: Input should be greater than or equal to 1",
        ),
        (
            "pool:\n  min_workers: -1\n  max_workers: 2\n",
            "pool.yaml line 2: pool.min_workers: Input should be greater than or equal to 0",
        ),
        (
            "pool:\n  workers: 2\n  idle_timeout: 5\n",
            "pool.yaml line 3: pool.idle_timeout: only for an autoscaled pool: use "
            "pool.min_workers/max_workers instead of pool.workers, or drop idle_timeout",
        ),
        (
            "pool:\n  max_workers: 2\n  idle_timeout: 0\n",
            "pool.yaml line 3: pool.idle_timeout: Input should be greater than 0",
        ),
    ],
)
def test_size_errors_are_one_line_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(PoolSpecError) as e:
        parse_pool_spec(text, "pool.yaml")
    assert str(e.value) == message


# -- the decision ----------------------------------------------------------------------


def worker(
    id: int, leases: int = 0, idle_since: float | None = 0.0, status: WorkerStatus = READY
) -> WorkerLoad:
    return WorkerLoad(id, id, status, leases, None if leases else idle_since)


def test_a_pool_of_zero_grows_for_a_job_before_its_first_batch() -> None:
    d = decide(low=0, high=4, idle_timeout=2, waiting=0, jobs=1, workers=[], now=10)
    assert (d.target, d.launch, d.stop) == (1, 1, [])
    assert d.reason == "scaling up from 0 to 1: 1 job with no batch waiting yet"


def test_grows_one_worker_per_waiting_batch_up_to_max() -> None:
    d = decide(low=0, high=4, idle_timeout=2, waiting=3, jobs=1, workers=[worker(0, 1)], now=10)
    assert (d.target, d.launch) == (4, 3)
    assert d.reason == "scaling up from 1 to 4: 3 batches waiting, 1 busy"
    d = decide(low=0, high=4, idle_timeout=2, waiting=50, jobs=1, workers=[], now=10)
    assert (d.target, d.launch) == (4, 4)
    assert d.reason == "scaling up from 0 to 4 (max_workers): 50 batches waiting, 0 busy"


def test_workers_still_starting_count_toward_the_size() -> None:
    starting = [worker(i, status=STARTING, idle_since=None) for i in range(2)]
    d = decide(low=0, high=4, idle_timeout=2, waiting=2, jobs=1, workers=starting, now=10)
    assert (d.target, d.launch, d.stop) == (2, 0, [])
    assert d.reason == "2 workers: 2 batches waiting, 0 busy"


def test_full_and_busy_stays() -> None:
    workers = [worker(i, 1) for i in range(4)]
    d = decide(
        low=0, high=4, idle_timeout=2, waiting=1000, waiting_capped=True, jobs=1,
        workers=workers, now=10,
    )  # fmt: skip
    assert (d.target, d.launch, d.stop) == (4, 0, [])
    assert d.reason == "4 workers (max_workers): 1000+ batches waiting, 4 busy"


def test_shrinks_by_idle_workers_only_after_idle_timeout() -> None:
    workers = [worker(0, 1), worker(1, idle_since=9.5), worker(2, idle_since=7), worker(3, 0, 5)]
    early = decide(low=0, high=4, idle_timeout=2, waiting=0, jobs=1, workers=workers, now=8)
    assert (early.target, early.stop) == (1, [3])
    late = decide(low=0, high=4, idle_timeout=2, waiting=0, jobs=1, workers=workers, now=10)
    # Longest idle first; the worker with a lease is never picked.
    assert (late.target, late.launch, late.stop) == (1, 0, [3, 2])
    assert late.reason == (
        "scaling down from 4 to 2: 0 batches waiting, 1 busy, 2 idle for 2s or more"
    )


def test_waits_out_idle_timeout() -> None:
    workers = [worker(0, idle_since=9), worker(1, idle_since=9)]
    d = decide(low=0, high=4, idle_timeout=2, waiting=0, jobs=0, workers=workers, now=10)
    assert (d.target, d.stop) == (0, [])
    assert (
        d.reason == "2 workers, 0 wanted: no batches waiting, 2 idle (a worker stops after 2s idle)"
    )


def test_never_below_min_and_empty_at_zero() -> None:
    d = decide(low=2, high=4, idle_timeout=2, waiting=0, jobs=0, workers=[], now=100)
    assert (d.target, d.launch, d.reason) == (
        2,
        2,
        "scaling up from 0 to 2 (min_workers): no batches waiting",
    )
    workers = [worker(i) for i in range(3)]
    d = decide(low=2, high=4, idle_timeout=2, waiting=0, jobs=0, workers=workers, now=100)
    assert (d.target, len(d.stop)) == (2, 1)
    d = decide(low=2, high=4, idle_timeout=2, waiting=0, jobs=0, workers=workers[:2], now=100)
    assert (d.target, d.stop, d.reason) == (2, [], "2 workers (min_workers): no batches waiting")
    d = decide(low=0, high=4, idle_timeout=2, waiting=0, jobs=0, workers=[], now=100)
    assert (d.target, d.launch, d.stop, d.reason) == (0, 0, [], "0 workers: no batches waiting")
    assert not d.changes


def test_a_busy_pool_with_nothing_waiting_keeps_its_busy_workers() -> None:
    workers = [worker(0, 1), worker(1, 2), worker(2, 0, idle_since=0)]
    d = decide(low=0, high=4, idle_timeout=2, waiting=0, jobs=1, workers=workers, now=100)
    assert (d.target, d.stop) == (2, [2])
    assert (d.busy, d.idle, d.waiting) == (2, 1, 0)

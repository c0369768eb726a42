"""The scheduler's pure decisions, table-driven."""

from __future__ import annotations

import pytest

from skybatch.server.scheduler import (
    SPLIT_BASE,
    Candidate,
    Verdict,
    backoff,
    choose_job,
    judge_failure,
    signal_is_mapper_caused,
    split_indices,
)


@pytest.mark.parametrize(
    ("candidates", "last", "expected"),
    [
        ([], None, None),
        ([Candidate(3, 0)], None, 3),
        ([Candidate(1, 2), Candidate(2, 0)], 1, 2),  # a job with no worker comes first
        ([Candidate(1, 2), Candidate(2, 1)], 2, 2),  # then the worker stays on its job
        ([Candidate(1, 2), Candidate(2, 1)], 9, 1),  # else the oldest job
        ([Candidate(5, 0), Candidate(4, 0)], 5, 4),  # starving jobs: oldest first
    ],
)
def test_choose_job(candidates: list[Candidate], last: int | None, expected: int | None) -> None:
    assert choose_job(candidates, last) == expected


def test_backoff_doubles() -> None:
    assert [backoff(n, 2.0) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]


def judge(
    mapper: bool, failures: int, system: int, cap: int = 10
) -> tuple[Verdict, int, int, float]:
    o = judge_failure(
        mapper_caused=mapper,
        failures=failures,
        system_failures=system,
        max_retries=3,
        retry_backoff=2.0,
        max_system_failures=cap,
        now=100.0,
    )
    return o.verdict, o.failures, o.system_failures, o.ready_at


@pytest.mark.parametrize(
    ("mapper", "failures", "system", "expected"),
    [
        (True, 0, 0, (Verdict.RETRY, 1, 0, 102.0)),
        (True, 1, 0, (Verdict.RETRY, 2, 0, 104.0)),
        (True, 2, 0, (Verdict.RETRY, 3, 0, 108.0)),
        (True, 3, 0, (Verdict.FAILED, 4, 0, 100.0)),  # 1 try + 3 retries, then the batch fails
        (False, 3, 0, (Verdict.RETRY, 3, 1, 100.0)),  # the system's fault: free, at once
        (False, 0, 9, (Verdict.RETRY, 0, 10, 100.0)),
        (False, 0, 10, (Verdict.RETRY, 1, 11, 102.0)),  # past the cap it costs a retry
        (False, 3, 10, (Verdict.FAILED, 4, 11, 100.0)),
    ],
)
def test_judge_failure(
    mapper: bool, failures: int, system: int, expected: tuple[Verdict, int, int, float]
) -> None:
    assert judge(mapper, failures, system) == expected


def test_split_batches_count_up_from_the_split_base() -> None:
    assert split_indices(0, 2) == [SPLIT_BASE, SPLIT_BASE + 1]
    assert split_indices(2, 1) == [SPLIT_BASE + 2]


def test_only_a_repeated_signal_death_is_the_mappers() -> None:
    assert not signal_is_mapper_caused(0)
    assert signal_is_mapper_caused(1) and signal_is_mapper_caused(3)

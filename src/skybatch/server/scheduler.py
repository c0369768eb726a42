"""Scheduling decisions, pure: no I/O, time passed in. The store applies them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "SPLIT_BASE",
    "Candidate",
    "FailureOutcome",
    "Verdict",
    "backoff",
    "choose_job",
    "judge_failure",
    "lease_share",
    "signal_is_mapper_caused",
    "split_indices",
]

#: Batches made by splitting a failed batch get indices from here up, clear of planned ones.
SPLIT_BASE = 1_000_000_000


@dataclass(frozen=True)
class Candidate:
    """A job with a batch ready to lease, and how many of its batches are leased now."""

    job_id: int
    leased: int


def choose_job(candidates: Sequence[Candidate], last_job: int | None) -> int | None:
    """Which job a free worker serves next.

    Every job with ready work gets at least one worker (oldest first); beyond
    that a worker stays on the job it last served, because switching jobs
    means starting another runner and loading another model.
    """
    if not candidates:
        return None
    starving = [c.job_id for c in candidates if c.leased == 0]
    if starving:
        return min(starving)
    if last_job is not None and any(c.job_id == last_job for c in candidates):
        return last_job
    return min(c.job_id for c in candidates)


def lease_share(wanted: int, left: int, workers: int) -> int:
    """How many batches one lease may take: what the agent asked for (enough work to
    hide a request's cost), but no more than half of a fair share of the batches left,
    so that near a job's end every worker still has some."""
    return max(1, min(wanted, left // max(1, 2 * workers)))


def backoff(failures: int, base: float) -> float:
    """Seconds before retry number ``failures`` (1-based): base, 2·base, 4·base, ..."""
    return base * 2 ** (failures - 1)


class Verdict(str, Enum):
    RETRY = "RETRY"
    FAILED = "FAILED"


@dataclass(frozen=True)
class FailureOutcome:
    verdict: Verdict
    failures: int
    system_failures: int
    ready_at: float


def judge_failure(
    *,
    mapper_caused: bool,
    failures: int,
    system_failures: int,
    max_retries: int,
    retry_backoff: float,
    max_system_failures: int,
    now: float,
) -> FailureOutcome:
    """What a failed attempt does to its batch.

    A mapper error costs a retry and waits out the backoff. A failure the
    system caused (lost worker, runner killed by a signal) is retried at once
    and costs nothing, until ``max_system_failures``; past that each one costs
    a retry like a mapper error, so a batch that kills every worker ends.
    """
    if not mapper_caused:
        system_failures += 1
        if system_failures <= max_system_failures:
            return FailureOutcome(Verdict.RETRY, failures, system_failures, now)
    failures += 1
    if failures > max_retries:
        return FailureOutcome(Verdict.FAILED, failures, system_failures, now)
    return FailureOutcome(
        Verdict.RETRY, failures, system_failures, now + backoff(failures, retry_backoff)
    )


def signal_is_mapper_caused(signals: int) -> bool:
    """Whether a runner killed by a signal the agent did not send counts as the mapper's
    failure, given the batch's earlier such deaths.

    One kill from outside (an operator, the OOM killer for another process's sake)
    is not the mapper's fault; a batch whose runner dies again is.
    """
    return signals > 0


def split_indices(splits: int, count: int) -> list[int]:
    """Indices for ``count`` batches split from a failed one, after the job's ``splits``
    earlier ones: never a planned batch's (the reduce orders parts by first row)."""
    return [SPLIT_BASE + splits + k for k in range(count)]

"""A batch as the server plans it, leases it and reduces it: :class:`BatchPlan`,
:class:`Part`, and the lease body of the agent protocol.

Below every layer that handles batches (readers, the store, the server, the
agent), so none of them has to import another for these shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias, TypedDict, Union

__all__ = ["BatchPlan", "LeaseBody", "Part", "Place", "lease_from_wire", "lease_to_wire"]

#: Where an agent wrote one writer's part of a batch: ``size`` (a file of its own,
#: ``part_path``, of that many bytes), ``[segment, offset, size]`` (a byte range of the
#: segment file the agent wrote for a lease's batches, ``segment_path``), or None (not
#: one file, or not recorded). Parts are not synced to disk: the reduce checks these.
Place: TypeAlias = Union[int, list[int], None]  # noqa: UP007 (a runtime alias on 3.10)


@dataclass(frozen=True)
class BatchPlan:
    """One batch as a descriptor: where its rows are, not the rows themselves."""

    index: int
    file: int  # index into the reader's file list
    start: int  # first byte
    end: int  # one past the last byte
    row_start: int  # global index of the batch's first row
    row_count: int
    line: int  # 1-based line of the first row in its file, for error messages

    def halved(self, cut: int, rows: int, line: int) -> list[BatchPlan]:
        """The two halves of this batch (to isolate failing rows): the first ends at byte
        ``cut`` after ``rows`` rows, the second starts there, on line ``line``. Their
        indices are set by the caller."""
        return [
            BatchPlan(0, self.file, self.start, cut, self.row_start, rows, self.line),
            BatchPlan(
                0, self.file, cut, self.end, self.row_start + rows, self.row_count - rows, line
            ),
        ]


@dataclass(frozen=True)
class Part:
    """A committed batch's part: which attempt wrote it, and which rows it holds."""

    batch: int
    attempt: int
    row_start: int
    row_count: int
    #: Per writer, where its agent wrote the part (see :data:`Place`); None: not known.
    places: tuple[Place, ...] | None = None
    #: This writer's entry of ``places`` (set by the reduce for each writer).
    place: Place = None


class LeaseBody(TypedDict):
    """A batch's lease as the agent protocol carries it (a plain dict on the wire)."""

    attempt: int
    job_id: int
    index: int
    file: int
    start: int
    end: int
    row_start: int
    row_count: int
    generation: int  # the job's generation: a resume bumps it, agents refetch the job
    line: int


# Built and read once per batch: a dict literal and positional arguments, no
# validation layer, so the protocol costs what it did when each side wrote it by hand.


def lease_to_wire(attempt: int, job_id: int, generation: int, batch: BatchPlan) -> LeaseBody:
    """The ``lease`` of a lease answer, as the server sends it."""
    return {
        "attempt": attempt,
        "job_id": job_id,
        "index": batch.index,
        "file": batch.file,
        "start": batch.start,
        "end": batch.end,
        "row_start": batch.row_start,
        "row_count": batch.row_count,
        "generation": generation,
        "line": batch.line,
    }


def lease_from_wire(lease: LeaseBody) -> tuple[int, int, int, BatchPlan]:
    """``(attempt, job_id, generation, batch)`` from a lease sent by :func:`lease_to_wire`."""
    batch = BatchPlan(
        lease["index"],
        lease["file"],
        lease["start"],
        lease["end"],
        lease["row_start"],
        lease["row_count"],
        lease["line"],
    )
    return lease["attempt"], lease["job_id"], lease["generation"], batch

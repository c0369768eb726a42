"""The progress bar of a streamed job: rows done of total, rows/s, ETA, failures."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

__all__ = ["JobProgress"]


class JobProgress:
    """Follows a job's view as it changes; rows count only once committed."""

    def __init__(self, job_id: str, name: str) -> None:
        self._bar = tqdm(
            desc=f"job {job_id} ({name})",
            unit=" rows",
            total=None,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        self._health: str | None = None

    def update(self, view: dict[str, Any]) -> None:
        bar = self._bar
        if view["indexed"] and bar.total != view["total_rows"]:
            bar.total = view["total_rows"]
        postfix = {
            "batches": f"{view['committed_batches']}/{view['total_batches']}"
            + ("" if view["indexed"] else "+")
        }
        failed = view["retries"] + view["failed_batches"]
        if failed:
            postfix["failed"] = str(failed)
        if view["lost"]:
            postfix["lost"] = str(view["lost"])
        if view["status"] not in ("RUNNING", "SUCCEEDED"):
            postfix["status"] = view["status"]
        health = view.get("health")
        if health:
            postfix["health"] = "stalled"
        if health != self._health:
            # A line of its own above the bar: too long for the postfix.
            if health:
                bar.write(f"job {view['id']}: {health}", file=sys.stderr)
            elif self._health:
                bar.write(f"job {view['id']}: going on again", file=sys.stderr)
            self._health = health
        bar.set_postfix(postfix, refresh=False)
        bar.update(view["committed_rows"] - bar.n)

    def close(self) -> None:
        self._bar.close()

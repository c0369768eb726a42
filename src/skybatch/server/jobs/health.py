"""What holds a running job back without failing it (a full disk: agents', the job
logs', state.db's), one line per source, kept in memory and shown in the job's view."""

from __future__ import annotations

from skybatch.server.jobs.runtime import Runtime
from skybatch.server.store import JobRecord
from skybatch.wire import JobFields, JobView

__all__ = ["Health", "job_view"]


def job_view(job: JobRecord, health: str | None = None) -> JobView:
    """The job as the API shows it: its fields, with the status as its name."""
    fields = {name: getattr(job, name) for name in JobFields.model_fields}
    fields.update(
        status=job.status.value, outputs=[w["path"] for w in job.spec["writers"]], health=health
    )
    return JobView.model_validate(fields)


class Health:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def health(self, job_id: int) -> str | None:
        """What holds the job back now (a full disk), in one line; None if nothing."""
        problems = list(self.rt.health.get(job_id, {}).values())
        if self.rt.state_full is not None:
            problems.insert(0, self.rt.state_full)
        return "; ".join(problems) or None

    def view(self, job: JobRecord) -> JobView:
        return job_view(job, None if job.status.finished else self.health(job.id))

    def set_health(self, job_id: int, source: str, message: str | None) -> None:
        entries = self.rt.health.get(job_id, {})
        if entries.get(source) == message:
            return
        if message is None:
            del entries[source]
        else:
            entries[source] = message
        if entries:
            self.rt.health[job_id] = entries
        else:
            self.rt.health.pop(job_id, None)
        self.rt.notify(job_id)  # followers (the progress bar) see it at once

    def report_health(self, job_id: int, worker_index: int, message: str | None) -> None:
        """An agent's word on what holds its batch of the job back (None: nothing now)."""
        self.rt.get(job_id)
        self.set_health(job_id, f"worker-{worker_index}", message)

"""``JobService``: the one object the routes and the pool service call, composing the
parts of a job's life, each in its own module:

- ``admission``: submit and resume (``specs``: the checks of a request's specs);
- ``indexing``: the thread that streams a job's input into batches;
- ``leasing``: the lease long poll;
- ``outcomes``: commit, fail, and a batch out of retries (bisection, poison rows);
- ``ending``: a job failed (its failure text, its recovery hint), finished, cancelled;
- ``publish``: the reduce into the outputs, ``reduce_results``, in-memory results;
- ``logs``, ``health``, ``waiting``: what the job's followers read.

The parts share one ``Runtime`` (the context and the in-memory state of jobs).
"""

from __future__ import annotations

from skybatch.server.context import Context
from skybatch.server.jobs.admission import Admission
from skybatch.server.jobs.ending import Ending
from skybatch.server.jobs.health import Health
from skybatch.server.jobs.indexing import Indexer
from skybatch.server.jobs.leasing import Leasing
from skybatch.server.jobs.logs import Logs
from skybatch.server.jobs.outcomes import Outcomes
from skybatch.server.jobs.publish import Publisher
from skybatch.server.jobs.runtime import Runtime, ready_to_reduce
from skybatch.server.jobs.waiting import Waiting
from skybatch.states import JobStatus

__all__ = ["JobService"]


class JobService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        rt = self._rt = Runtime(ctx)
        ending = Ending(rt)
        publisher = self._publisher = Publisher(rt, ending)
        indexer = self._indexer = Indexer(rt, ending, publisher)
        admission = Admission(rt, indexer, publisher)
        outcomes = Outcomes(rt, ending, publisher)
        health = Health(rt)
        logs = Logs(rt, health)
        waiting = Waiting(rt)
        # The parts' own bound methods, not wrappers: a lease or a commit takes no
        # extra call on its way in.
        self.get = rt.get
        self.submit = admission.submit
        self.resume = admission.resume
        leasing = Leasing(ctx)
        self.lease = leasing.lease
        self.lease_many = leasing.lease_many
        self.commit = outcomes.commit
        self.commit_many = outcomes.commit_many
        self.fail = outcomes.fail
        self.handle_exhausted = outcomes.handle_exhausted
        self.cancel = ending.cancel
        self.stop_indexing = indexer.stop_all
        self.reduce_partial = publisher.reduce_partial
        self.results_path = publisher.results_path
        self.wait = waiting.wait
        self.settled = waiting.settled
        self.view = health.view
        self.health = health.health
        self.set_health = health.set_health
        self.report_health = health.report_health
        self.append_log = logs.append_log
        self.read_logs = logs.read_logs

    def resume_unfinished(self) -> None:
        """After a restart: finish reduces under way, and indexing cut short."""
        for job in self.ctx.store.list_jobs(active_only=True):
            if job.status is JobStatus.REDUCING:
                self._publisher.after_restart(job)
            elif ready_to_reduce(job):
                self._rt.spawn(self._publisher.reduce(job.id))
            elif not job.indexed:
                self._indexer.after_restart(job)

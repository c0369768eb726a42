"""Indexing: a thread per job streams its input once and hands the batches it finds to
the scheduler as it goes, so workers start before it ends; cancel and shutdown stop
it between two blocks, and its starts are counted so an input that brings the server
down is not indexed again at every start."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from skybatch import defaults
from skybatch.errors import SkyBatchError
from skybatch.io.base import InputReader
from skybatch.io.formats.files import FileReader
from skybatch.io.registry import reader_from_spec
from skybatch.server.jobs.ending import Ending
from skybatch.server.jobs.publish import Publisher
from skybatch.server.jobs.runtime import Runtime
from skybatch.server.store import JobRecord

__all__ = ["Indexer"]

log = logging.getLogger("skybatch.server")


class Indexer:
    def __init__(self, rt: Runtime, ending: Ending, publisher: Publisher) -> None:
        self.rt = rt
        self.ctx = rt.ctx
        self.ending = ending
        self.publisher = publisher
        self._stopping = False  # shutting down: a stopped indexing is no crash

    def start(self, job: JobRecord, reader: InputReader, fresh: bool = True) -> None:
        """Index the job's input in a thread, past the batches it recorded already.

        A start after a restart (not ``fresh``) was counted by ``after_restart``.
        """
        loop = asyncio.get_running_loop()
        self.rt.spawn(asyncio.to_thread(self._index, loop, job, reader, fresh))

    def after_restart(self, job: JobRecord) -> None:
        """Go on indexing what a server restart cut short, unless restarts keep doing so."""
        reader = reader_from_spec(job.spec["reader"])
        # An input that brings the server down would do so again at every start.
        starts = self.ctx.store.note_index_start(job.id, restart=True)
        if starts > defaults.MAX_INDEX_STARTS:
            self.rt.spawn(
                self.ending.fail(
                    job.id,
                    f"job {job.id} ({job.name}) failed: indexing its input "
                    f"{reader.describe()} was interrupted by server restarts "
                    f"{starts - 1} times without finding a new batch, so it is not "
                    "started again; check the input and submit a new job, or resume "
                    f"this one (`skybatch jobs resume {job.id}`) if the restarts had "
                    "another cause",
                )
            )
            return
        self.start(job, reader, fresh=False)

    def stop_all(self) -> None:
        """At shutdown: end every indexing thread at its next block, so the process exits."""
        self._stopping = True
        for stop in list(self.rt.indexing.values()):
            stop.set()

    def _index(
        self, loop: asyncio.AbstractEventLoop, job: JobRecord, reader: InputReader, fresh: bool
    ) -> None:
        """Stream the input once, handing batches to the scheduler as they are found.

        The ``job.planned`` batches recorded before (a restart, a resume) are not
        added again.
        """
        store = self.ctx.store
        job_id, pool, skip = job.id, job.pool, job.planned
        buf = []
        flushed = time.monotonic()
        stop = threading.Event()
        self.rt.indexing[job_id] = stop
        if isinstance(reader, FileReader):
            reader.stop = stop
        try:
            if fresh:
                store.note_index_start(job_id, restart=False)
            latest = store.get_job(job_id)
            if latest is None or latest.status.finished:
                return  # cancelled before this thread began
            for plan in reader.plan(job.spec["batch_size"]):
                if plan.index < skip:
                    continue
                buf.append(plan)
                # The first batch goes out at once so workers start while indexing goes on.
                if (
                    plan.index == 0
                    or len(buf) >= defaults.INDEX_FLUSH_BATCHES
                    or time.monotonic() - flushed > 0.2
                ):
                    latest = store.get_job(job_id)
                    if latest is None or latest.status.finished:
                        return
                    store.add_batches(job_id, buf, done=False)
                    buf = []
                    flushed = time.monotonic()
                    self.ctx.notifier.notify_threadsafe(("pool", pool))
            if stop.is_set():
                log.info("indexing job %d stopped", job_id)
                if self._stopping:
                    # A clean shutdown is no crash: the next start must not count it as one.
                    store.note_index_start(job_id, restart=False)
                return
            store.add_batches(job_id, buf, done=True)
        except SkyBatchError as e:
            asyncio.run_coroutine_threadsafe(self.ending.fail(job_id, str(e)), loop)
            return
        except Exception as e:
            log.exception("indexing job %d failed", job_id)
            asyncio.run_coroutine_threadsafe(
                self.ending.fail(job_id, f"reading the input failed: {type(e).__name__}: {e}"),
                loop,
            )
            return
        finally:
            if self.rt.indexing.get(job_id) is stop:
                del self.rt.indexing[job_id]
        self.ctx.notifier.notify_threadsafe(("pool", pool))
        asyncio.run_coroutine_threadsafe(self.publisher.after_progress(job_id), loop)

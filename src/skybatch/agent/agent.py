"""The worker agent: set up once, then lease, read, run, write, commit.

Three threads keep the runner busy: the fetcher leases the next batch and
reads its input while the runner works on the current one; the main thread
feeds the runner; the committer writes parts and commits in the background.
A fourth sends heartbeats, which renew leases and carry cancellations back;
a fifth ships the runners' output, best effort: logs never hold a commit back.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import os
import queue
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skybatch import defaults
from skybatch.agent import http
from skybatch.agent.process import Outcome, Output, RunnerProcess
from skybatch.batches import BatchPlan, Place, lease_from_wire
from skybatch.config import Home, forbid_inspection, pinned_context
from skybatch.errors import InputError, OutputError, SkyBatchError
from skybatch.io import storage
from skybatch.io.base import InputReader, OutputWriter
from skybatch.io.registry import reader_from_spec, writer_from_spec

__all__ = ["main"]


class AgentExit(Exception):
    """The agent should stop: its worker was stopped, or the server is gone for good."""


def _say(message: str) -> None:
    # The agent's log may sit on a full disk; that must not end the agent.
    with contextlib.suppress(OSError):
        print(f"[agent {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) is a full disk or quota."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _dropped_marker(count: int) -> bytes:
    return (
        f"[skybatch: {count} bytes of this worker's output were dropped here: the server "
        "could not store them, or they came faster than it took them]\n"
    ).encode()


def _wrong_certificate(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class ServerLink:
    """HTTP to the server that rides out its restarts (it may come back on a new port).

    With ``cert`` (the PEM of an HTTPS server's certificate) it trusts that certificate
    and nothing else: a server that shows another one is never sent the token.
    """

    def __init__(self, url: str, token: str, home: Home | None, cert: str | None = None) -> None:
        self.token = token
        self.home = home
        self._verify: ssl.SSLContext | None = pinned_context(cert) if cert else None
        self._lock = threading.Lock()
        self._client = self._make(url)

    def _make(self, url: str) -> http.Client:
        if url.startswith("https://") and self._verify is None:
            raise AgentExit(f"the server at {url} serves HTTPS, but no certificate was given")
        headers = {"Authorization": f"Bearer {self.token}"}
        # The server answers only the Host it serves on; a provider whose URL names
        # something else passes that Host on here. Not SKYBATCH_SERVER_HOST: that is the
        # server's own bind address, which its local agents inherit.
        if os.environ.get("SKYBATCH_AGENT_SERVER_HOST"):
            headers["Host"] = os.environ["SKYBATCH_AGENT_SERVER_HOST"]
        # Through the SSH provider's tunnel the server is a Unix socket on this host that
        # only our user can reach; the URL still names the server, for its Host check.
        return http.Client(
            url,
            headers,
            timeout=30.0,
            context=self._verify,
            uds=os.environ.get("SKYBATCH_SERVER_SOCKET") or None,
        )

    def _rediscover(self) -> None:
        if self.home is None:
            return
        with contextlib.suppress(OSError, ValueError, KeyError):
            import json

            url = json.loads(self.home.server_file.read_text())["url"]
            with self._lock:
                if str(self._client.base_url).rstrip("/") != url.rstrip("/"):
                    self._client = self._make(url)

    def call(self, method: str, path: str, **kwargs: Any) -> http.Response:
        down_since: float | None = None
        delay = 0.05
        while True:
            try:
                response = self._client.request(method, path, **kwargs)
            except http.TransportError as e:
                if _wrong_certificate(e):
                    # Not the server this agent was given: waiting will not make it so.
                    raise AgentExit(
                        f"the server at {self._client.base_url} showed a TLS certificate "
                        "other than the one this agent was given"
                    ) from None
                response = None
            if response is not None and response.status_code < 500:
                if response.status_code == 401:
                    raise AgentExit("the server refused this agent's token")
                return response
            now = time.monotonic()
            if response is not None and response.status_code == 507:
                down_since = None  # the server is up, its disk full: wait for space
            down_since = down_since or now
            if now - down_since > defaults.ORPHAN_TIMEOUT:
                raise AgentExit(f"no server for {defaults.ORPHAN_TIMEOUT:.0f}s")
            self._rediscover()
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def try_call(self, method: str, path: str, timeout: float, **kwargs: Any) -> int | None:
        """One request, no retries (for what is best effort): its status, or None."""
        try:
            return self._client.request(method, path, timeout=timeout, **kwargs).status_code
        except http.TransportError:
            return None


@dataclass
class JobContext:
    spec: dict[str, Any]
    reader: InputReader
    writers: list[OutputWriter]
    init: dict[str, Any]
    generation: int
    #: Per writer: its parts go up to the server (a local output this worker cannot see).
    relayed: list[bool]


@dataclass
class Item:
    """A leased batch on its way through the agent."""

    attempt: int
    job: int
    generation: int
    plan: BatchPlan
    payload: bytes | None = None
    read_error: str | None = None
    outcome: Outcome | None = None
    run_seconds: float | None = None  # in the runner, when it succeeded
    ends_group: bool = True  # the last batch of the lease that brought it
    sizes: list[Place] | None = None  # where its parts were written, per writer


class _Revoked(Exception):
    """The server says the attempt no longer holds its batch: nothing of it may land."""


class Agent:
    def __init__(
        self, link: ServerLink, worker_id: int, index: int, workdir: Path, relay: bool = False
    ) -> None:
        self.link = link
        #: This worker does not see the server's files (SKYBATCH_RELAY=1): local-path
        #: inputs and outputs go through the server (server/relay.py).
        self.relay = relay
        self.worker_id = worker_id
        self.index = index
        self.workdir = workdir
        self.base = f"/v1/agent/workers/{worker_id}"
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.busy = False
        self.held: set[int] = set()
        self.held_jobs: collections.Counter[int] = collections.Counter()  # batches held, per job
        self.revoked: set[int] = set()
        self.current: Item | None = None
        self.jobs: dict[int, JobContext] = {}
        self.runners: dict[int, RunnerProcess] = {}
        #: A runner started ahead of its job (see RunnerProcess), for the next one.
        self.spare: RunnerProcess | None = None
        #: A finished job's runner, its mapper ended, for a next job of the same mapper.
        self.idle_runner: RunnerProcess | None = None
        # Each job's runner output, until shipped; outlives the job's runners.
        self.outputs: dict[int, Output] = {}
        self.outputs_lock = threading.Lock()
        self.log_lock = threading.Lock()  # one shipper at a time, or lines would swap
        self.log_retry_at = 0.0  # after a failed log request, wait before the next one
        self.log_ends_line: dict[int, bool] = collections.defaultdict(lambda: True)
        # Leased batches waiting for the runner (a lease may bring several), and run
        # batches waiting for the committer, which commits what has piled up at once.
        self.ready: queue.Queue[Item] = queue.Queue()
        self.done: queue.Queue[Item | None] = queue.Queue(maxsize=2 * defaults.LEASE_MAX_BATCHES)
        #: Recent seconds per batch in the runner and bytes per payload (moving averages,
        #: of the job last run): how many batches the next lease asks for.
        self.batch_seconds: float | None = None
        self.payload_bytes = 0.0
        self.last_job: int | None = None
        self.failure: BaseException | None = None

    # -- threads -------------------------------------------------------------------------

    def _thread(self, target: Any, name: str) -> threading.Thread:
        def guarded() -> None:
            try:
                target()
            except BaseException as e:  # one thread's end ends the agent
                self.failure = e
                self.stop.set()

        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        return t

    def run(self) -> None:
        # Ready before the first job comes (most jobs have no activate_env).
        self.spare = RunnerProcess(None, self.workdir)
        self._thread(self._fetch_loop, "fetch")
        committer = self._thread(self._commit_loop, "commit")
        self._thread(self._heartbeat_loop, "heartbeat")
        self._thread(self._log_loop, "logs")
        try:
            while not self.stop.is_set():
                try:
                    item = self.ready.get(timeout=0.5)
                except queue.Empty:
                    continue
                with self.idle:
                    self.current = item
                    self.busy = True
                    self.idle.notify_all()  # the fetcher may prefetch the next one now
                try:
                    item.outcome = self._process(item)
                    self._timed(item)
                finally:
                    with self.idle:
                        self.current = None
                        self.busy = False
                        self.idle.notify_all()
                self.done.put(item)
        finally:
            self.stop.set()
            with contextlib.suppress(queue.Full):
                self.done.put_nowait(None)
            committer.join(timeout=5)
            extra = [r for r in (self.spare, self.idle_runner) if r is not None]
            for r in [*self.runners.values(), *extra]:
                r.kill()
            self._ship_logs(force=True)
        if self.failure is not None and not isinstance(self.failure, AgentExit):
            raise self.failure

    def _job(self, job_id: int, generation: int) -> JobContext:
        ctx = self.jobs.get(job_id)
        if ctx is None or ctx.generation != generation:
            # New job, or resumed (maybe with a fixed mapper): fetch its spec again.
            spec = self.link.call("GET", f"/v1/agent/jobs/{job_id}").json()
            writers = [writer_from_spec(w) for w in spec["writers"]]
            reader = reader_from_spec(spec["reader"])
            init = {
                **spec["mapper"],
                "writers": [w.runner_spec() for w in writers],
                "payload_format": reader.payload_format,
            }
            relayed = [self.relay and storage.is_local(w.path) for w in writers]
            ctx = JobContext(spec, reader, writers, init, generation, relayed)
            self.jobs[job_id] = ctx
        return ctx

    def _group_size(self) -> int:
        """Batches to ask for: enough runner time to hide a request's cost, from the
        recent batch times (one until a batch of the job was timed)."""
        seconds = self.batch_seconds
        if seconds is None:
            return 1
        want = int(defaults.LEASE_GROUP_SECONDS / max(seconds, 1e-6))
        if self.payload_bytes:
            want = min(want, int(defaults.LEASE_GROUP_BYTES / self.payload_bytes))
        return max(1, min(want, defaults.LEASE_MAX_BATCHES))

    def _fetch_loop(self) -> None:
        low = 0  # lease again once the runner is this close to the end of what is held
        while not self.stop.is_set():
            with self.idle:
                while self.ready.qsize() > low and not self.stop.is_set():
                    self.idle.wait(0.5)
                prefetch = self.busy
            body = {
                "prefetch": prefetch,
                "wait": 0 if prefetch else defaults.LEASE_WAIT,
                "max": self._group_size(),
            }
            r = self.link.call(
                "POST", f"{self.base}/lease", json=body, timeout=defaults.LEASE_WAIT + 10
            )
            if r.status_code == 409:
                raise AgentExit(r.json()["error"]["message"])
            leases = r.json()["leases"]
            if not leases:
                if prefetch:
                    with self.idle:
                        if self.busy:
                            self.idle.wait(1.0)
                continue
            items = []
            for n, lease in enumerate(leases, 1):
                attempt, job, generation, plan = lease_from_wire(lease)
                item = Item(attempt, job, generation, plan, ends_group=n == len(leases))
                items.append(item)
            with self.lock:
                self.held.update(item.attempt for item in items)
                self.held_jobs.update(item.job for item in items)
            # Read ahead of the runner by a quarter of a group: the next lease and its
            # reads overlap the last batches of this one.
            low = len(items) // 4
            for item in items:
                try:
                    reader = self._job(item.job, item.generation).reader
                    if self.relay:
                        item.payload = self._read_relayed(reader, item)
                    else:
                        item.payload = reader.read(item.plan)
                except SkyBatchError as e:
                    item.read_error = str(e)
                self.ready.put(item)

    def _read_relayed(self, reader: InputReader, item: Item) -> bytes:
        """The batch's payload: from the server when its source is a local path there."""
        url = reader.source_url(item.plan)
        if url is None or not storage.is_local(url):
            return reader.read(item.plan)  # an object store, or a reader of the user's own
        r = self.link.call(
            "GET",
            f"/v1/agent/jobs/{item.job}/batches/{item.plan.index}/input",
            params={"attempt": item.attempt},
        )
        if r.status_code != 200:
            raise InputError(_message(r))
        return r.content

    def _write_relayed(self, item: Item, writer: OutputWriter, data: bytes) -> int | None:
        """Upload a part to the server, which writes it where this worker would have."""
        index = item.plan.index
        if writer.part_is_file:
            data = writer.encode_part(index, data)
        if len(data) > defaults.RELAY_PART_BYTES:
            raise OutputError(
                f"batch {index}'s part for {writer.path} is {len(data)} bytes, more than the "
                f"relay to the server takes ({defaults.RELAY_PART_BYTES} bytes); lower "
                "batch_size, or write the output to an object store the workers reach"
            )
        path = writer.part_path(item.job, index, item.attempt)
        r = self.link.call(
            "POST",
            f"/v1/agent/attempts/{item.attempt}/part",
            params={"job": item.job, "batch": index, "path": path},
            content=data,
        )
        if r.status_code == 409:
            raise _Revoked()
        if r.status_code != 200:
            error = OutputError(_message(r))
            if r.json().get("error", {}).get("disk_full"):
                # Seen as a full disk by _write_parts: kept, and tried again.
                raise error from OSError(errno.ENOSPC, "no space left on the server")
            raise error
        return len(data) if writer.part_is_file else None

    def _keep_idle(self, runner: RunnerProcess) -> None:
        """A finished job's runner: its mapper ended, kept for the next job of the same
        mapper (one at a time; the one kept before goes)."""
        try:
            kept = not runner.killed and runner.alive() and runner.finish()
        except Exception as e:  # nothing here may end the agent: the runner just goes
            _say(f"a finished job's runner could not be kept: {e!r}")
            kept = False
        if not kept or self.stop.is_set():
            runner.close(0)
            return
        with self.lock:
            old, self.idle_runner = self.idle_runner, runner
        if old is not None:
            old.close()

    def _idle_runner_like(
        self, init: dict[str, Any], activate_env: str | None
    ) -> RunnerProcess | None:
        """A runner of an earlier job with this same mapper and formats, taken over:
        jobs of one mapper in a row (many small ones) then start no Python each. Not
        one whose job still has batches here: two jobs taking turns would run the
        mapper's setup (a model's load) at every turn."""
        with self.lock:
            idle, self.idle_runner = self.idle_runner, None
        if idle is not None:
            if idle.init == init and idle.activate_env == activate_env and idle.alive():
                return idle
            idle.close()  # another mapper: what the old one holds (a GPU) goes first
        with self.lock:
            for job_id, runner in list(self.runners.items()):
                if (
                    self.held_jobs[job_id] <= 0
                    and runner.init == init
                    and runner.activate_env == activate_env
                    and not runner.killed
                    and runner.alive()
                ):
                    return self.runners.pop(job_id)
        return None

    def _take_spare(self, activate_env: str | None) -> RunnerProcess:
        """A started runner for ``activate_env``: the spare when it matches and lives,
        else a new one."""
        spare, self.spare = self.spare, None
        if spare is not None and (spare.activate_env != activate_env or not spare.alive()):
            spare.retire()
            spare = None
        return spare or RunnerProcess(activate_env, self.workdir)

    def _timed(self, item: Item) -> None:
        """Fold a batch's runner time into the averages that size the next lease."""
        seconds = item.run_seconds
        if seconds is None:
            return
        size = float(len(item.payload or b""))
        if self.batch_seconds is None or item.job != self.last_job:
            self.batch_seconds, self.payload_bytes = seconds, size
        else:
            self.batch_seconds += 0.3 * (seconds - self.batch_seconds)
            self.payload_bytes += 0.3 * (size - self.payload_bytes)
        self.last_job = item.job

    def _process(self, item: Item) -> Outcome:
        if item.read_error is not None:
            return Outcome(error=item.read_error)
        job = self._job(item.job, item.generation)
        runner = self.runners.get(item.job)
        if runner is None or not runner.alive() or runner.generation != item.generation:
            if runner is not None:
                runner.close(0)
            with self.outputs_lock:
                output = self.outputs.get(item.job)
                if output is None:
                    output = self.outputs[item.job] = Output(defaults.LOG_BUFFER_BYTES)
            activate_env = job.spec.get("activate_env")
            runner = self._idle_runner_like(job.init, activate_env)
            if runner is None or not runner.next_job(item.job, output):
                runner = self._take_spare(activate_env)
                runner.start(item.job, job.init, output)
                if not self.stop.is_set():
                    # Started once this one has (activate_env done): never two at once.
                    self.spare = RunnerProcess(activate_env, self.workdir)
            runner.generation = item.generation
            with self.lock:
                self.runners[item.job] = runner
        assert item.payload is not None
        if item.attempt in self.revoked:
            return Outcome(error="revoked")
        started = time.monotonic()
        outcome = runner.run(
            item.plan.index,
            item.plan.row_start,
            item.payload,
            len(job.writers),
            job.spec.get("batch_timeout"),
        )
        if outcome.ok:
            item.run_seconds = time.monotonic() - started
        elif outcome.input_line is not None:
            # As the indexer says it of a line it parses (io/formats/jsonl.py).
            url = job.reader.source_url(item.plan)
            outcome.error = (
                f"{url} line {item.plan.line + outcome.input_line}: {outcome.error}; "
                "fix or remove the line"
            )
        return outcome

    def _commit_loop(self) -> None:
        while True:
            item = self.done.get()
            if item is None:
                return
            # What else has finished meanwhile is committed in the same request, and the
            # rest of a lease's group (short batches) is waited for: one commit per group.
            items, last = [item], False
            deadline = time.monotonic() + defaults.COMMIT_GROUP_WAIT
            while len(items) < 2 * defaults.LEASE_MAX_BATCHES:
                try:
                    if items[-1].ends_group:
                        more = self.done.get_nowait()
                    else:
                        more = self.done.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    last = True
                    break
                items.append(more)
            try:
                self._finish(items)
            finally:
                with self.lock:
                    self.held.difference_update(i.attempt for i in items)
                    self.held_jobs.subtract(i.job for i in items)
                    for job_id in [j for j, n in self.held_jobs.items() if n <= 0]:
                        del self.held_jobs[job_id]
            if last:
                return

    def _finish(self, items: list[Item]) -> None:
        """Write the parts of the batches that succeeded and commit them in one request;
        report the others' failures."""
        to_commit: list[Item] = []
        failed: list[tuple[Item, Outcome]] = []
        # Per segment written: its job, its writers' numbers, and the attempts in it.
        segments: dict[int, tuple[JobContext, int, list[int], set[int]]] = {}
        groups: dict[tuple[int, int], list[Item]] = {}
        for item in items:
            outcome = item.outcome
            assert outcome is not None
            if item.attempt in self.revoked:
                continue  # cancelled or re-leased elsewhere: nothing of it may land
            if not outcome.ok:
                failed.append((item, outcome))
                continue
            groups.setdefault((item.job, item.generation), []).append(item)
        for (job_id, generation), group in groups.items():
            job = self._job(job_id, generation)
            # Outputs that take a lease's parts in one file each; the others, a file a part.
            together = [n for n, w in enumerate(job.writers) if w.segments() and not job.relayed[n]]
            written: list[Item] = []
            for item in group:
                result = self._with_space(
                    item, [item], functools.partial(self._write_own, item, job)
                )
                if result is True:
                    written.append(item)
                elif result is not False:  # False: revoked (or stopping) while the disk was full
                    error = f"writing the batch's output failed: {result}"
                    failed.append((item, Outcome(error=error, mapper_caused=False)))
            if together and written:
                segment = written[0].attempt
                write = functools.partial(self._write_segments, job, segment, written)
                result = self._with_space(written[0], written, write)
                if result is not True:
                    if result is not False:
                        error = f"writing the batch's output failed: {result}"
                        failed.extend(
                            (i, Outcome(error=error, mapper_caused=False)) for i in written
                        )
                    continue
                segments[segment] = (job, job_id, together, {i.attempt for i in written})
            to_commit.extend(written)
        # Logs first: once the job is seen to end, its output is all there.
        for job_id in {i.job for i in items}:
            self._ship_logs(job_id)
        if to_commit:
            self._commit(to_commit, segments)
        for item, outcome in failed:
            self.link.call(
                "POST",
                f"/v1/agent/attempts/{item.attempt}/fail",
                json={
                    "kind": outcome.kind,
                    "error": outcome.error or "unknown error",
                    "traceback": outcome.traceback,
                },
            )

    def _commit(
        self, items: list[Item], segments: dict[int, tuple[JobContext, int, list[int], set[int]]]
    ) -> None:
        """Commit written batches in one request; remove what the refused ones wrote."""
        attempts = [i.attempt for i in items]
        sizes = [i.sizes for i in items]
        r = self.link.call(
            "POST", f"{self.base}/commit", json={"attempts": attempts, "sizes": sizes}
        )
        if r.status_code == 409:
            raise AgentExit(_message(r))
        refused = set(r.json()["refused"])
        for item in items:
            if item.attempt in refused:
                job = self._job(item.job, item.generation)
                for writer, relayed, size in zip(
                    job.writers, job.relayed, item.sizes or [], strict=True
                ):
                    # (A relayed part lies on the server, never reduced, removed with the
                    # job's staging area; a segment goes once all its batches are refused.)
                    if not relayed and not isinstance(size, list):
                        writer.discard_part(item.job, item.plan.index, item.attempt)
        for segment, (job, job_id, numbers, held) in segments.items():
            if held <= refused:
                for n in numbers:
                    job.writers[n].discard_segment(job_id, segment)

    def _write_own(self, item: Item, job: JobContext) -> None:
        """Write the batch's parts that go in files of their own."""
        assert item.outcome is not None and item.outcome.parts is not None
        sizes: list[Place] = []
        for writer, relayed, data in zip(job.writers, job.relayed, item.outcome.parts, strict=True):
            if relayed:
                sizes.append(self._write_relayed(item, writer, data))
            elif writer.segments():
                sizes.append(None)  # in the lease's segment (_write_segments)
            else:
                sizes.append(writer.write_part(item.job, item.plan.index, item.attempt, data))
        item.sizes = sizes

    def _write_segments(self, job: JobContext, segment: int, items: list[Item]) -> None:
        """Write the batches' parts of each output that takes segments, one file each."""
        for n, (writer, relayed) in enumerate(zip(job.writers, job.relayed, strict=True)):
            if relayed or not writer.segments():
                continue
            parts = []
            for item in items:
                assert item.outcome is not None and item.outcome.parts is not None
                parts.append(writer.encode_part(item.plan.index, item.outcome.parts[n]))
            places = writer.write_segment(items[0].job, segment, parts)
            for item, place in zip(items, places, strict=True):
                assert item.sizes is not None
                item.sizes[n] = place

    def _with_space(self, item: Item, watch: list[Item], write: Callable[[], None]) -> bool | str:
        """Run ``write``: True once done, False if given up, else the error.

        A full disk (or quota) is no fault of the batches: the agent keeps their
        leases (heartbeats renew them), tells the server, whose job view shows it, and
        tries again with a capped backoff until space returns or they are revoked.
        """
        delay = 0.5
        reported = False
        while True:
            try:
                write()
            except _Revoked:
                return False
            except SkyBatchError as e:
                if not _disk_full(e):
                    return str(e)
                if not reported:
                    _say(f"batch {item.plan.index} of job {item.job}: {e}; retrying")
                self._report_health(
                    item.job,
                    f"worker {self.index} cannot write the job's output: {e}; "
                    "free space there and the job goes on",
                )
                reported = True
                if self.stop.wait(delay) or all(i.attempt in self.revoked for i in watch):
                    return False
                delay = min(delay * 2, defaults.WRITE_RETRY_MAX_DELAY)
                continue
            if reported:
                _say(f"batch {item.plan.index} of job {item.job}: written after all")
                self._report_health(item.job, None)
            return True

    def _report_health(self, job_id: int, message: str | None) -> None:
        # Best effort: a server that cannot take it now hears it at the next retry.
        self.link.try_call(
            "POST",
            f"/v1/agent/jobs/{job_id}/health/{self.index}",
            defaults.LOG_SHIP_TIMEOUT,
            json={"message": message},
        )

    def _heartbeat_loop(self) -> None:
        interval = defaults.HEARTBEAT_INTERVAL
        while not self.stop.wait(interval):
            with self.lock:
                held = sorted(self.held)
            r = self.link.call("POST", f"{self.base}/heartbeat", json={"attempts": held})
            if r.status_code == 409:
                raise AgentExit(r.json()["error"]["message"])
            reply = r.json()
            with self.lock:
                self.revoked.update(reply["revoked"])
                current = self.current
            if current is not None and current.attempt in self.revoked:
                runner = self.runners.get(current.job)
                if runner is not None:
                    _say(
                        f"batch {current.plan.index} of job {current.job} was revoked; "
                        "stopping its runner"
                    )
                    runner.stop(defaults.KILL_GRACE)
            active = set(reply["active_jobs"])
            for job_id in [j for j in list(self.runners) if j not in active]:
                if current is None or current.job != job_id:
                    with self.lock:  # the main thread may have taken it for another job
                        runner = self.runners.pop(job_id, None)
                    if runner is not None:
                        # In a thread of its own: the mapper's code after its loop may
                        # take a while, and heartbeats must go on.
                        threading.Thread(
                            target=self._keep_idle, args=(runner,), name="finish", daemon=True
                        ).start()
                    self.jobs.pop(job_id, None)

    def _log_loop(self) -> None:
        while not self.stop.wait(0.2):
            self._ship_logs()
            with self.outputs_lock:
                # A job this agent is done with (its context is added before its
                # output, and dropped when it ends here), its output all out: forget it.
                for job_id in [j for j in self.outputs if j not in self.jobs]:
                    if self.outputs[job_id].empty():
                        del self.outputs[job_id]

    def _ship_logs(self, job: int | None = None, force: bool = False) -> None:
        """Send the runners' new output (of one job, or all) to the server, best effort.

        Each request is tried once with a short timeout; bytes it could not send are
        counted and reported by a marker line once a request succeeds again. After a
        failure, shipping pauses (the buffer keeps filling, then counts drops), so a
        failing log store never holds the commit thread back.
        """
        if not force and time.monotonic() < self.log_retry_at:
            return
        with self.outputs_lock:
            jobs = [job] if job is not None else list(self.outputs)
            outputs = [(j, self.outputs[j]) for j in jobs if j in self.outputs]
        for job_id, output in outputs:
            # At most a buffer's worth per call: a mapper printing without pause
            # must not keep a shipper here forever.
            if not self._ship_output(job_id, output, defaults.LOG_BUFFER_BYTES):
                self.log_retry_at = time.monotonic() + 1.0
                return

    def _ship_output(self, job_id: int, output: Output, budget: int) -> bool:
        """Send up to ``budget`` bytes of a job's output; False if a request failed."""
        path = f"/v1/agent/jobs/{job_id}/logs/{self.index}"
        while budget > 0:
            # The commit and log threads both ship: one request at a time keeps the
            # order; the lock is taken per request, so neither waits long for it.
            if not self.log_lock.acquire(timeout=defaults.LOG_SHIP_TIMEOUT):
                return True
            try:
                data, dropped = output.take(defaults.LOG_SHIP_BYTES)
                if dropped:
                    prefix = b"" if self.log_ends_line[job_id] else b"\n"
                    data = prefix + _dropped_marker(dropped)
                if not data:
                    return True
                status = self.link.try_call("POST", path, defaults.LOG_SHIP_TIMEOUT, content=data)
                if status is not None and status < 400:
                    self.log_ends_line[job_id] = data.endswith(b"\n")
                elif status != 404:  # 404: the job is gone (pruned); nobody reads it
                    output.lose(dropped or len(data))
                    return False
            finally:
                self.log_lock.release()
            budget -= len(data)
        return True


def _message(r: http.Response) -> str:
    """The one-line error of a refused request."""
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"the server answered {r.status_code}: {r.text[:200]}"


def run_setup(link: ServerLink, worker_id: int, info: dict[str, Any], workdir: Path) -> bool:
    """Run the pool's setup once per worker; a marker with its hash skips it next time."""
    marker = workdir / ".skybatch" / "setup.done"
    setup = info.get("setup")
    if not setup:
        return True
    if marker.exists() and marker.read_text() == info["setup_hash"]:
        _say("setup already done for this setup text; skipping it")
        return True
    _say("running setup")
    proc = subprocess.Popen(
        ["bash", "-c", setup],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    tail: collections.deque[str] = collections.deque(maxlen=200)
    assert proc.stdout is not None
    for raw in proc.stdout:
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        tail.append(raw.decode(errors="replace"))
    code = proc.wait()
    if code != 0:
        link.call(
            "POST",
            f"/v1/agent/workers/{worker_id}/setup-failed",
            json={"exit_code": code, "output": "".join(tail)},
        )
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(info["setup_hash"])
    _say("setup complete")
    return True


_PEM_END = "-----END CERTIFICATE-----"


def _read_credentials(url: str, home: Home | None) -> tuple[str, str | None]:
    """The token and, for an HTTPS server, the PEM of its certificate.

    The provider hands the token over on stdin (read once), not in the environment,
    which every process of our user can read in /proc; an environment token (another
    provider's way) is taken out of os.environ, so no child inherits it. A remote
    provider writes the certificate after the token; an agent on the server's machine
    finds it in SKYBATCH_HOME instead."""
    token = os.environ.pop("SKYBATCH_TOKEN", "")
    cert_lines: list[str] = []
    if not token:
        token = sys.stdin.readline().strip()
        if url.startswith("https://"):
            for _ in range(1000):  # a certificate is a few dozen lines; bounded all the same
                line = sys.stdin.readline()
                if not line:
                    break
                cert_lines.append(line)
                if line.strip() == _PEM_END:
                    break
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    if not token:
        raise SystemExit("skybatch agent: no token on stdin or in SKYBATCH_TOKEN")
    cert = "".join(cert_lines).strip() or None
    if cert is None and url.startswith("https://") and home is not None:
        with contextlib.suppress(OSError):
            cert = home.cert_file.read_text()
    return token, cert


def main() -> int:
    forbid_inspection()  # the token lives in this process's memory
    url = os.environ["SKYBATCH_SERVER_URL"]
    home = Home(Path(os.environ["SKYBATCH_HOME"])) if os.environ.get("SKYBATCH_HOME") else None
    token, cert = _read_credentials(url, home)
    worker_id = int(os.environ["SKYBATCH_WORKER_ID"])
    workdir = Path.cwd()

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    try:
        link = ServerLink(url, token, home, cert)
        r = link.call("POST", f"/v1/agent/workers/{worker_id}/register", json={"pid": os.getpid()})
        if r.status_code >= 400:
            _say(f"not registered: {r.text}")
            return 0
        info = r.json()
        _say(f"worker {info['index']} of pool {info['pool']} registered")
        if not run_setup(link, worker_id, info, workdir):
            return 1
        link.call("POST", f"/v1/agent/workers/{worker_id}/ready")
        relay = os.environ.get("SKYBATCH_RELAY") == "1"
        if relay:
            _say("local paths of the server are relayed through it (SKYBATCH_RELAY=1)")
        Agent(link, worker_id, info["index"], workdir, relay).run()
    except AgentExit as e:
        _say(f"exiting: {e}")
    return 0

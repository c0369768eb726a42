"""``skybatch``: pools, jobs and the server from the shell.

Exit codes: 0 on success; 1 with a one-line error (``Error: ...``) when
skybatch refuses or fails; 2 for a malformed command line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click

from skybatch.errors import ConfigError, SkyBatchError

if TYPE_CHECKING:
    from skybatch.wire import ScalingView, WorkerView

F = TypeVar("F", bound=Callable[..., Any])


def _errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SkyBatchError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _ago(seconds: float) -> str:
    """SkyPilot's way of saying when: ``a few secs ago``, ``5 mins ago``, ``1 hr ago``."""
    seconds = max(0, int(seconds))
    if seconds < 10:
        return "a few secs ago"
    for size, unit in ((86400, "day"), (3600, "hr"), (60, "min"), (1, "sec")):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'' if n == 1 else 's'} ago"
    raise AssertionError("unreachable")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="skybatch")
def main() -> None:
    """Run one Python function over a large dataset on a pool of workers."""


# -- pools -------------------------------------------------------------------------------


@main.group()
def pool() -> None:
    """Create, inspect and tear down worker pools."""


@pool.command("apply")
@click.argument("file", type=click.Path(dir_okay=False), required=False)
@click.option("-p", "--pool", "name", default=None, help="Pool name (default: FILE's `name:`).")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Number of workers, in place of the YAML's pool.workers; without FILE, "
    "resizes the pool as it is.",
)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@_errors
def pool_apply_cmd(file: str | None, name: str | None, workers: int | None, yes: bool) -> None:
    """Create the pool described by FILE, or update (resize, restart) an existing one.

    One of FILE or --workers is needed: `skybatch pool apply -p NAME --workers 5`
    resizes pool NAME without its YAML.
    """
    from skybatch.client.admin import apply_spec, pool_spec, pool_status
    from skybatch.pools.spec import load_pool_file

    if name is None:
        # A SkyPilot task's `name:` names the pool when -p does not.
        name = load_pool_file(file).name if file is not None else None
        if name is None:
            raise ConfigError("name the pool: -p NAME (or `name:` in its YAML file)")
    spec = pool_spec(file, name, workers)  # validate before asking anything
    for line in spec.warnings:  # SkyPilot fields this pool ignores, one line each
        click.echo(line, err=True)
    existed = name in (p.name for p in pool_status())
    if not yes:
        click.confirm(
            f"Apply pool {name!r}: {spec.size_text()} worker(s) on {spec.provider}?",
            default=True,
            abort=True,
        )
    click.echo(f"Applying pool {name!r} ({spec.size_text()} workers); waiting for setup...")
    view = apply_spec(spec, name)
    # SkyPilot's words, which scripts grep for.
    click.echo(f"Successfully {'updated' if existed else 'created'} pool {name!r}.")
    click.echo(f"Pool {name!r} is {view.status}: {view.ready}/{view.workers} workers ready.")


@pool.command("status")
@click.argument("names", nargs=-1)
@_errors
def pool_status_cmd(names: tuple[str, ...]) -> None:
    """Show pools (all, or the NAMES given) and, for named pools, their workers."""
    from skybatch.client.admin import pool_status

    pools = [p for n in dict.fromkeys(names) for p in pool_status(n)] if names else pool_status()
    if not pools:
        click.echo("No pools. Create one with `skybatch pool apply pool.yaml --pool NAME`.")
        return
    rows = []
    for p in pools:
        res = ", ".join(f"{k}={v}" for k, v in p.resources.items()) or "-"
        jobs = ",".join(str(j) for j in p.active_jobs) or "-"
        rows.append([p.name, p.status, f"{p.ready}/{p.workers}", p.provider, res, jobs])
    click.echo(_table(["POOL", "STATUS", "READY", "PROVIDER", "RESOURCES", "JOBS"], rows))
    one = len(pools) == 1 and bool(names)
    for p in pools:
        if p.scaling is not None:
            click.echo(scaling_text(p.scaling, None if one else p.name))
    for p in pools if names else []:
        click.echo("")
        if not one:
            click.echo(f"Pool {p.name!r}:")
        click.echo(worker_table(p.worker_list))
        if p.error:
            click.echo(f"\nError: {p.error}")


def scaling_text(s: ScalingView, pool: str | None = None) -> str:
    """Why an autoscaled pool has its size: its bounds and queue, then its last step."""
    text = (
        f"Scaling{f' {pool}' if pool else ''}: {s.min_workers}-{s.max_workers} workers, "
        f"idle_timeout {s.idle_timeout:g}s; now {s.reason}"
    )
    if s.last_decision is not None and s.decided_at is not None:
        at = datetime.fromtimestamp(s.decided_at).strftime("%H:%M:%S")
        text += (
            f"\nLast step: {s.last_decision} (at {at}, "
            f"{_duration(max(0.0, time.time() - s.decided_at))} ago)"
        )
    return text


def worker_table(workers: Sequence[WorkerView]) -> str:
    """`pool status NAME`'s worker rows: where each runs, its GPUs, what it is doing."""

    def batch(w: WorkerView) -> str:
        if w.batch is None:
            return "-"
        # A prefetched batch waits behind the one the runner works on.
        return f"{w.batch} +{w.leases - 1}" if w.leases > 1 else str(w.batch)

    def heard(w: WorkerView) -> str:
        return "-" if w.heartbeat_age is None else f"{_duration(w.heartbeat_age)} ago"

    return _table(
        [
            "WORKER",
            "STATUS",
            "PID",
            "PROVIDER",
            "HOST",
            "GPUS",
            "JOB",
            "BATCH",
            "DONE",
            "HEARTBEAT",
        ],
        [
            [
                w.index,
                w.status,
                w.pid or "-",
                w.provider or "-",
                w.host or "-",
                ",".join(str(g) for g in w.gpus) or "-",
                "-" if w.job is None else w.job,
                batch(w),
                w.batches_done,
                heard(w),
            ]
            for w in workers
        ],
    )


@pool.command("down")
@click.argument("names", nargs=-1)
@click.option("-a", "--all", "all_pools", is_flag=True, help="Tear down every pool.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@_errors
def pool_down_cmd(names: tuple[str, ...], all_pools: bool, yes: bool) -> None:
    """Stop the pools' workers (cancelling their running jobs) and remove them."""
    from skybatch.client.admin import pool_down, pool_status

    if bool(names) == all_pools:
        raise click.UsageError("give pool names or --all, not both")
    todo = [p.name for p in pool_status()] if all_pools else list(dict.fromkeys(names))
    if not todo:
        click.echo("No pools to tear down.")
        return
    if not yes:
        listed = ", ".join(repr(n) for n in todo)
        click.confirm(f"Tear down pool(s) {listed}?", default=False, abort=True)
    for name in todo:
        left = pool_down(name)
        click.echo(f"Pool {name!r} is down.")
        for line in left:
            click.echo(f"Warning: {line}", err=True)


# -- jobs --------------------------------------------------------------------------------


@main.group()
def jobs() -> None:
    """List, cancel and read the logs of jobs."""


@jobs.command("queue")
@_errors
def jobs_queue_cmd() -> None:
    """Show every job: status, progress in batches and rows, timing."""
    from skybatch.client.admin import jobs_queue

    views = jobs_queue()
    if not views:
        click.echo("No jobs.")
        return
    now = time.time()
    rows = []
    for j in views:
        # "+" while the input is still being indexed: the total can only grow.
        total_b = f"{j.total_batches}" + ("" if j.indexed else "+")
        total_r = f"{j.total_rows}" + ("" if j.indexed else "+")
        end = j.finished_at or now
        rows.append(
            [
                j.id,
                j.name,
                j.pool,
                j.status,
                f"{j.committed_batches}/{total_b}",
                f"{j.committed_rows}/{total_r}",
                _ago(now - j.submitted_at),
                _duration(end - j.submitted_at),
            ]
        )
    # PROGRESS counts batches, as Sky Batch's queue does; ROWS the rows within them.
    click.echo(
        _table(["ID", "NAME", "POOL", "STATUS", "PROGRESS", "ROWS", "SUBMITTED", "DURATION"], rows)
    )
    # Too long for a column: what holds a running job back, one line per job.
    for j in views:
        if j.health:
            click.echo(f"Job {j.id}: {j.health}")


@jobs.command("cancel")
@click.argument("job_ids", nargs=-1)
@click.option("-a", "--all", "all_jobs", is_flag=True, help="Cancel every running job.")
@click.option("-p", "--pool", default=None, help="Cancel every running job of this pool.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@_errors
def jobs_cancel_cmd(job_ids: tuple[str, ...], all_jobs: bool, pool: str | None, yes: bool) -> None:
    """Stop jobs' batches (JOB_IDS, --all or --pool); their pools keep running.

    A job that has already finished is reported and skipped (exit 0).
    """
    from skybatch.client.admin import cancel, jobs_queue
    from skybatch.client.api import Client
    from skybatch.errors import ConflictError
    from skybatch.states import JobStatus
    from skybatch.wire import JobView

    if sum((bool(job_ids), all_jobs, pool is not None)) != 1:
        raise click.UsageError("give job ids, --all or --pool NAME (one of them)")
    todo = list(dict.fromkeys(job_ids))
    if not todo:
        todo = [
            str(j.id)
            for j in jobs_queue()
            if not JobStatus(j.status).finished and (pool is None or j.pool == pool)
        ]
        if not todo:
            click.echo("No running jobs to cancel" + (f" on pool {pool!r}." if pool else "."))
            return
        # Only a bulk cancel asks: `jobs cancel ID` worked without -y before.
        if not yes:
            click.confirm(f"Cancel job(s) {', '.join(todo)}?", default=False, abort=True)
    failed = False
    for job_id in todo:
        try:
            cancel(job_id)
        except ConflictError:
            status = JobView.model_validate(Client.connect().get_job(job_id)).status
            if not JobStatus(status).finished:
                raise
            click.echo(f"Job {job_id} already {status}; nothing to cancel.")
            continue
        except SkyBatchError as e:
            if len(todo) == 1:
                raise
            # One bad id does not keep the others running.
            click.echo(f"Error: {e}", err=True)
            failed = True
            continue
        click.echo(f"Job {job_id} cancelled.")
    if failed:
        sys.exit(1)


@jobs.command("prune")
@click.option(
    "--older-than",
    "days",
    type=click.FloatRange(min=0),
    default=None,
    help="Only jobs that finished more than DAYS days ago.",
)
@click.option(
    "--keep", type=click.IntRange(min=0), default=0, help="Keep the N newest finished jobs."
)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@_errors
def jobs_prune_cmd(days: float | None, keep: int, yes: bool) -> None:
    """Forget finished jobs: their state, logs and results (running jobs are kept)."""
    from skybatch.client.admin import prune_jobs

    if not yes:
        which = "finished jobs" + (f" older than {days:g} days" if days is not None else "")
        kept = f", keeping the {keep} newest," if keep else ""
        click.confirm(
            f"Forget {which}{kept} with their logs, results and kept parts?",
            default=False,
            abort=True,
        )
    pruned = prune_jobs(days, keep)
    click.echo(f"Pruned {len(pruned)} finished job(s)." if pruned else "No jobs to prune.")


@jobs.command("resume")
@click.argument("job_id")
@click.option("--no-stream", is_flag=True, help="Return at once instead of following the job.")
@_errors
def jobs_resume_cmd(job_id: str, no_stream: bool) -> None:
    """Run the batches a failed or cancelled job did not commit, then publish its output."""
    from skybatch.client.dataset import Job

    Job(job_id).resume(stream=not no_stream)
    click.echo(f"Job {job_id} resumed." if no_stream else f"Job {job_id} succeeded.")


@jobs.command("logs")
@click.argument("job_id")
@click.option("--worker", type=int, default=None, help="Only this worker's output.")
@click.option(
    "-f",
    "--follow/--no-follow",
    default=True,
    help="Keep printing until the job ends (the default), or print what is there and stop.",
)
@_errors
def jobs_logs_cmd(job_id: str, worker: int | None, follow: bool) -> None:
    """Print the mapper's stdout and stderr (all workers unless --worker), following the
    job until it ends unless --no-follow."""
    from skybatch.client.api import Client
    from skybatch.client.dataset import format_log_chunk

    client = Client.connect()
    offsets: dict[int, int] = {}
    more = False
    # Replies are paged (a megabyte at most): print each and ask for the next, so a
    # huge log streams through in bounded memory.
    while True:
        reply = client.logs(job_id, worker, offsets, wait=10 if follow and not more else 0)
        for chunk in reply["chunks"]:
            sys.stdout.write(format_log_chunk(chunk, tag=worker is None))
            offsets[chunk["worker"]] = chunk["offset"]
        sys.stdout.flush()
        more = bool(reply.get("more"))
        if more:
            continue
        done = reply["status"] in ("SUCCEEDED", "FAILED", "CANCELLED")
        if not follow or (done and not any(c["text"] for c in reply["chunks"])):
            return


# -- server ------------------------------------------------------------------------------


@main.group()
def server() -> None:
    """Start, stop and inspect this deployment's server (SKYBATCH_HOME)."""


@server.command("start")
@click.option(
    "--host",
    metavar="ADDR",
    help="Address to serve, one the workers reach (default 127.0.0.1, or "
    "$SKYBATCH_SERVER_HOST). Any address but loopback is served over HTTPS only, with a "
    "self-signed certificate made in SKYBATCH_HOME that clients and agents pin.",
)
@_errors
def server_start_cmd(host: str | None) -> None:
    """Start the server if it is not running."""
    from skybatch.client.launcher import ensure_server

    info = ensure_server(host=host)
    click.echo(f"Server running at {info.url} (pid {info.pid}).")


@server.command("stop")
@_errors
def server_stop_cmd() -> None:
    """Stop the server and its pools' workers (they come back at the next start)."""
    from skybatch.client.launcher import stop_server

    if stop_server():
        click.echo("Server stopped.")
    else:
        click.echo("Server was not running.")


@server.command("status")
@_errors
def server_status_cmd() -> None:
    """Say whether the server runs, where, and for which SKYBATCH_HOME."""
    from skybatch.client.launcher import running_server
    from skybatch.config import home

    h = home().check()
    info = running_server(h)
    if info is None:
        click.echo(f"Server not running (home {h.root}).")
        sys.exit(1)
    click.echo(f"Server running at {info.url} (pid {info.pid}, home {h.root}).")


if __name__ == "__main__":
    main()

"""HTTP routes only: authentication, translation to services, errors as JSON."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

from skybatch import defaults
from skybatch.errors import ConfigError, SkyBatchError
from skybatch.server.agent_api import agent_routes
from skybatch.server.context import Context
from skybatch.server.guard import Guard
from skybatch.server.homefiles import reopen_log, restore_home
from skybatch.server.jobs import JobService
from skybatch.server.pools import PoolService
from skybatch.server.retention import prune_jobs
from skybatch.version import __version__
from skybatch.wire import (
    INT64_MAX,
    JobSubmit,
    JobView,
    LogChunk,
    LogsView,
    PoolApply,
    PoolView,
    ReduceRequest,
    ReduceResult,
    ResumeRequest,
)

__all__ = ["create_app"]

log = logging.getLogger("skybatch.server")

#: Ids are SQLite integers: a larger one is refused as a 4xx, not an overflow.
JobId = Annotated[int, Path(ge=0, le=INT64_MAX)]


def _with_bearer(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema says what the Guard enforces: a bearer token everywhere but /v1/health."""
    schema.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer"}
    }
    schema["security"] = [{"bearer": []}]
    health = schema.get("paths", {}).get("/v1/health", {}).get("get")
    if health is not None:
        health["security"] = []
    return schema


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "path", "query", "header"):
        parts = parts[1:] or parts
    return ".".join(parts) or "body"


def create_app(ctx: Context) -> FastAPI:
    jobs = JobService(ctx)
    pools = PoolService(ctx, jobs)

    deployment: str | None = None

    def leave_lost_home() -> None:
        """SKYBATCH_HOME was deleted under this server (the store wrote state.db back):
        put back the token, deployment id, server.json and log, then stop as on
        `skybatch server stop`. The workers' directories and the server's lock went
        with the home; the next client command starts a server from the restored state."""
        root = ctx.home.root
        try:
            if ctx.store.problem is None:
                restore_home(ctx.home, ctx.token, ctx.url, deployment)
            else:
                reopen_log(ctx.home)
        except (OSError, SkyBatchError) as e:
            log.error("SKYBATCH_HOME %s was deleted while the server ran: %s", root, e)
        if ctx.store.problem is not None:
            log.error("%s; stopping this server and its pools' agents", ctx.store.problem)
        else:
            log.warning(
                "SKYBATCH_HOME %s was deleted while the server ran; restored its state.db, "
                "token and server.json; stopping this server and its pools' agents (their "
                "directories went with it): the next skybatch command starts a server "
                "from the restored state",
                root,
            )
        os.kill(os.getpid(), signal.SIGTERM)  # the way `skybatch server stop` stops it

    async def monitor() -> None:
        while True:
            try:
                # A stat each tick, but writing a big state.db back takes seconds.
                await asyncio.to_thread(ctx.store.check_file)
                if ctx.store.home_lost:
                    leave_lost_home()
                    return
                await pools.monitor_once()
            except Exception:  # the monitor must outlive any one bad tick
                log.exception("monitor tick failed")
            await asyncio.sleep(defaults.MONITOR_INTERVAL)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal deployment
        ctx.notifier.bind(asyncio.get_running_loop())
        with contextlib.suppress(OSError, SkyBatchError):
            deployment = ctx.home.deployment_id()  # to put back if the home is deleted
        await pools.start_all()
        jobs.resume_unfinished()
        task = asyncio.create_task(monitor())
        try:
            yield
        finally:
            task.cancel()
            jobs.stop_indexing()
            await pools.stop_all()

    app = FastAPI(
        title="skybatch",
        version=__version__,
        lifespan=lifespan,
        # The schema is served behind the token (/v1/openapi.json), docs pages not at all.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        description="Control plane of a skybatch deployment. Every endpoint but "
        "/v1/health needs `Authorization: Bearer <token>` (the token file in SKYBATCH_HOME).",
    )

    # Host, token and body size are checked before routing, for the agent's routes too.
    served = urlsplit(ctx.url)
    app.add_middleware(Guard, token=ctx.token, port=served.port or 0, host=served.hostname)

    @app.exception_handler(SkyBatchError)
    async def on_error(request: Request, exc: SkyBatchError) -> JSONResponse:
        return JSONResponse(
            {"error": {"type": type(exc).__name__, "message": str(exc)}},
            status_code=exc.http_status,
        )

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # One line naming the field, in the error shape the clients read.
        err = exc.errors()[0]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        message = f"invalid request: {_field(tuple(err.get('loc', ())))}: {msg}"
        return JSONResponse({"error": {"type": "ConfigError", "message": message}}, status_code=422)

    @app.get("/v1/health")
    async def health() -> Any:
        if ctx.store.problem is not None:
            return JSONResponse({"ok": False, "error": ctx.store.problem}, status_code=503)
        return {"ok": True}

    api = APIRouter(prefix="/v1")

    @api.get("/server")
    async def server_info() -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "url": ctx.url,
            "home": str(ctx.home.root),
            "version": __version__,
        }

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return _with_bearer(app.openapi())

    # -- pools -----------------------------------------------------------------------

    @api.post("/pools/{name}")
    async def apply_pool(name: str, body: PoolApply) -> PoolView:
        return pools.view(await pools.apply(name, body.spec))

    @api.get("/pools")
    async def list_pools() -> list[PoolView]:
        return [pools.view(p) for p in ctx.store.list_pools()]

    @api.get("/pools/{name}")
    async def get_pool(name: str, wait: float = 0) -> PoolView:
        if wait > 0:
            return pools.view(await pools.wait_settled(name, min(wait, 60)))
        return pools.view(pools.get(name))

    @api.delete("/pools/{name}")
    async def down_pool(name: str) -> dict[str, Any]:
        # What a host out of reach kept (its agents, its files), for the user to know.
        return {"ok": True, "left": await pools.down(name)}

    # -- jobs ------------------------------------------------------------------------

    @api.post("/jobs")
    async def submit(body: JobSubmit) -> JobView:
        return jobs.view(await jobs.submit(body))

    @api.get("/jobs")
    async def list_jobs() -> list[JobView]:
        # A scan of every job; the views stay here, where the jobs' health changes.
        return [jobs.view(j) for j in await asyncio.to_thread(ctx.store.list_jobs)]

    @api.post("/jobs/prune")
    async def prune(older_than_days: float | None = None, keep: int = 0) -> dict[str, Any]:
        """Forget finished jobs but the ``keep`` newest and those younger than the age."""
        return {"pruned": await asyncio.to_thread(prune_jobs, ctx, older_than_days, keep)}

    @api.get("/jobs/{job_id}")
    async def get_job(
        job_id: JobId, version: int = -1, wait: float = 0, interval: float = 0
    ) -> JobView:
        """With ``wait``: a long poll for a change past ``version`` (answered no sooner
        than ``interval`` seconds in) or the job's end (at once)."""
        if wait > 0:
            interval = min(interval, 60) if interval > 0 else 0
            return jobs.view(await jobs.wait(job_id, version, min(wait, 60), interval))
        return jobs.view(await jobs.settled(job_id))

    @api.post("/jobs/{job_id}/cancel")
    async def cancel(job_id: JobId) -> JobView:
        return jobs.view(await jobs.cancel(job_id))

    @api.post("/jobs/{job_id}/resume")
    async def resume(job_id: JobId, body: ResumeRequest) -> JobView:
        return jobs.view(await jobs.resume(job_id, body.job))

    @api.get("/jobs/{job_id}/results")
    async def results(job_id: JobId) -> FileResponse:
        """The result rows (JSON Lines) of a succeeded job that had no output=."""
        return FileResponse(jobs.results_path(job_id), media_type="application/jsonl")

    @api.post("/jobs/{job_id}/reduce")
    async def reduce(job_id: JobId, body: ReduceRequest) -> ReduceResult:
        return ReduceResult(**await jobs.reduce_partial(job_id, body.writer))

    @api.get("/jobs/{job_id}/logs")
    async def logs(
        job_id: JobId, worker: int | None = None, offsets: str = "", wait: float = 0
    ) -> LogsView:
        """Each worker's new output; ``offsets`` is ``worker:offset,...`` from the last answer."""
        try:
            seen = {int(w): int(o) for w, o in (p.split(":") for p in offsets.split(",") if p)}
        except ValueError:
            raise ConfigError(f"offsets must look like 0:120,1:64, got {offsets!r}") from None
        chunks, job = jobs.read_logs(job_id, worker, seen)
        idle = not any(c[1] or c[3] for c in chunks)
        if idle and wait > 0 and not job.status.finished:
            await ctx.notifier.wait(("log", job_id), min(wait, 60))
            chunks, job = jobs.read_logs(job_id, worker, seen)
        return LogsView(
            status=job.status.value,
            chunks=[
                LogChunk(worker=w, text=data.decode(errors="replace"), offset=nxt)
                for w, data, nxt, _ in chunks
            ],
            more=any(c[3] for c in chunks),
        )

    app.include_router(api)
    app.router.routes.extend(agent_routes(ctx, jobs, pools))
    return app

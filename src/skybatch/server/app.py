"""HTTP routes only: authentication, translation to services, errors as JSON."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import FileResponse, JSONResponse

import skybatch
from skybatch import defaults
from skybatch.errors import AuthError, ConfigError, SkyBatchError
from skybatch.server.agent_api import agent_routes
from skybatch.server.context import Context
from skybatch.server.jobs import JobService, job_view
from skybatch.server.models import (
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
from skybatch.server.pools import PoolService

__all__ = ["create_app"]

log = logging.getLogger("skybatch.server")


def create_app(ctx: Context) -> FastAPI:
    jobs = JobService(ctx)
    pools = PoolService(ctx, jobs)

    async def monitor() -> None:
        while True:
            try:
                await pools.monitor_once()
            except Exception:  # the monitor must outlive any one bad tick
                log.exception("monitor tick failed")
            await asyncio.sleep(defaults.MONITOR_INTERVAL)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx.notifier.bind(asyncio.get_running_loop())
        await pools.start_all()
        jobs.resume_unfinished()
        task = asyncio.create_task(monitor())
        try:
            yield
        finally:
            task.cancel()
            await pools.stop_all()

    app = FastAPI(
        title="skybatch",
        version=skybatch.__version__,
        lifespan=lifespan,
        # The schema is served behind the token (/v1/openapi.json), docs pages not at all.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        description="Control plane of a skybatch deployment. Every endpoint but "
        "/v1/health needs `Authorization: Bearer <token>` (the token file in SKYBATCH_HOME).",
    )

    async def require_token(authorization: str = Header(default="")) -> None:
        # async: a sync dependency would cost every request a thread-pool hop
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token, ctx.token):
            raise AuthError("missing or wrong token; clients read it from SKYBATCH_HOME/token")

    @app.exception_handler(SkyBatchError)
    async def on_error(request: Request, exc: SkyBatchError) -> JSONResponse:
        return JSONResponse(
            {"error": {"type": type(exc).__name__, "message": str(exc)}},
            status_code=exc.http_status,
        )

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True}

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])

    @api.get("/server")
    async def server_info() -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "url": ctx.url,
            "home": str(ctx.home.root),
            "version": skybatch.__version__,
        }

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

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
        await pools.down(name)
        return {"ok": True}

    # -- jobs ------------------------------------------------------------------------

    @api.post("/jobs")
    async def submit(body: JobSubmit) -> JobView:
        return job_view(await jobs.submit(body))

    @api.get("/jobs")
    async def list_jobs() -> list[JobView]:
        return [job_view(j) for j in ctx.store.list_jobs()]

    @api.get("/jobs/{job_id}")
    async def get_job(job_id: int, version: int = -1, wait: float = 0) -> JobView:
        if wait > 0:
            return job_view(await jobs.wait(job_id, version, min(wait, 60)))
        return job_view(jobs.get(job_id))

    @api.post("/jobs/{job_id}/cancel")
    async def cancel(job_id: int) -> JobView:
        return job_view(await jobs.cancel(job_id))

    @api.post("/jobs/{job_id}/resume")
    async def resume(job_id: int, body: ResumeRequest) -> JobView:
        return job_view(await jobs.resume(job_id, body.job))

    @api.get("/jobs/{job_id}/results")
    async def results(job_id: int) -> FileResponse:
        """The result rows (JSON Lines) of a succeeded job that had no output=."""
        return FileResponse(jobs.results_path(job_id), media_type="application/jsonl")

    @api.post("/jobs/{job_id}/reduce")
    async def reduce(job_id: int, body: ReduceRequest) -> ReduceResult:
        return ReduceResult(**await jobs.reduce_partial(job_id, body.writer))

    @api.get("/jobs/{job_id}/logs")
    async def logs(
        job_id: int, worker: int | None = None, offsets: str = "", wait: float = 0
    ) -> LogsView:
        """Each worker's new output; ``offsets`` is ``worker:offset,...`` from the last answer."""
        try:
            seen = {int(w): int(o) for w, o in (p.split(":") for p in offsets.split(",") if p)}
        except ValueError:
            raise ConfigError(f"offsets must look like 0:120,1:64, got {offsets!r}") from None
        chunks, job = jobs.read_logs(job_id, worker, seen)
        if not any(c[1] for c in chunks) and wait > 0 and not job.status.finished:
            await ctx.notifier.wait(("log", job_id), min(wait, 60))
            chunks, job = jobs.read_logs(job_id, worker, seen)
        return LogsView(
            status=job.status.value,
            chunks=[
                LogChunk(worker=w, text=data.decode(errors="replace"), offset=nxt)
                for w, data, nxt in chunks
            ],
        )

    app.include_router(api)
    app.router.routes.extend(agent_routes(ctx, jobs, pools))
    return app

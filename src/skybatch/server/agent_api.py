"""The agent protocol: register, lease, heartbeat, commit, fail, logs (and the relay).

These routes are on every batch's path, so they skip FastAPI's dependency
injection and response models: plain Starlette routes, bodies validated with
pydantic's JSON parser, answers written with orjson. They are internal (only
agents call them) and stay out of the public OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from skybatch.batches import lease_to_wire
from skybatch.errors import ConfigError, SkyBatchError
from skybatch.server.context import Context
from skybatch.server.jobs import JobService
from skybatch.server.pools import PoolService
from skybatch.server.relay import Relay
from skybatch.wire import (
    INT64_MAX,
    CommitRequest,
    FailRequest,
    HealthReport,
    Heartbeat,
    LeaseRequest,
    Register,
    SetupFailed,
)

__all__ = ["agent_routes"]

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[Request], Awaitable[Any]]

_OK = orjson.dumps({"ok": True})


def _json(payload: Any, status: int = 200) -> Response:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return Response(body, status_code=status, media_type="application/json")


async def _body(request: Request, model: type[M]) -> M:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise ConfigError(f"invalid request body: {e.errors()[0]['msg']}") from None


def _int(request: Request, name: str) -> int:
    try:
        value = int(request.path_params[name])
    except ValueError:
        raise ConfigError(f"{name} must be an integer") from None
    if not 0 <= value <= INT64_MAX:  # past it SQLite would overflow
        raise ConfigError(f"{name} must be an integer from 0 to {INT64_MAX}, got {value}")
    return value


def agent_routes(ctx: Context, jobs: JobService, pools: PoolService) -> list[Route]:
    # The token, the Host and the body size are checked by the Guard before routing.

    def route(path: str, handler: Handler, method: str = "POST") -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                result = await handler(request)
            except SkyBatchError as e:
                err = {"error": {"type": type(e).__name__, "message": str(e)}}
                return _json(err, e.http_status)
            return _json(_OK if result is None else result)

        return Route(path, endpoint, methods=[method])

    async def register(request: Request) -> Any:
        body = await _body(request, Register)
        return pools.register(_int(request, "worker"), body.pid)

    async def ready(request: Request) -> None:
        pools.ready(_int(request, "worker"))

    async def setup_failed(request: Request) -> None:
        body = await _body(request, SetupFailed)
        pools.setup_failed(_int(request, "worker"), body.exit_code, body.output)

    async def heartbeat(request: Request) -> Any:
        body = await _body(request, Heartbeat)
        return pools.heartbeat(_int(request, "worker"), body.attempts)

    async def lease(request: Request) -> Any:
        worker_id = _int(request, "worker")
        body = await _body(request, LeaseRequest)
        worker = pools.live_worker(worker_id)
        got = await jobs.lease_many(worker_id, worker.pool, body.prefetch, body.wait, body.max)
        return {"leases": [lease_to_wire(g.attempt, g.job_id, g.generation, g.batch) for g in got]}

    async def job_spec(request: Request) -> Any:
        job = jobs.get(_int(request, "job"))
        return {"id": job.id, "status": job.status.value, **job.spec}

    async def commit(request: Request) -> None:
        await jobs.commit(_int(request, "attempt"))

    async def commit_many(request: Request) -> Any:
        body = await _body(request, CommitRequest)
        if body.sizes is not None and len(body.sizes) != len(body.attempts):
            raise ConfigError("invalid request body: sizes must have one entry per attempt")
        return {"refused": await jobs.commit_many(body.attempts, body.sizes)}

    async def fail(request: Request) -> None:
        body = await _body(request, FailRequest)
        await jobs.fail(_int(request, "attempt"), body.kind, body.error, body.traceback)

    async def append_log(request: Request) -> None:
        jobs.append_log(_int(request, "job"), _int(request, "worker"), await request.body())

    async def report_health(request: Request) -> None:
        body = await _body(request, HealthReport)
        jobs.report_health(_int(request, "job"), _int(request, "worker"), body.message)

    # Local files for agents that cannot see them (SKYBATCH_RELAY=1): see relay.py.
    relay = Relay(ctx)

    base = "/v1/agent"
    return [
        Route(f"{base}/jobs/{{job}}/batches/{{batch}}/input", relay.input, methods=["GET"]),
        Route(f"{base}/attempts/{{attempt}}/part", relay.part, methods=["POST"]),
        route(f"{base}/workers/{{worker}}/register", register),
        route(f"{base}/workers/{{worker}}/ready", ready),
        route(f"{base}/workers/{{worker}}/setup-failed", setup_failed),
        route(f"{base}/workers/{{worker}}/heartbeat", heartbeat),
        route(f"{base}/workers/{{worker}}/lease", lease),
        route(f"{base}/jobs/{{job}}", job_spec, method="GET"),
        route(f"{base}/attempts/{{attempt}}/commit", commit),
        route(f"{base}/workers/{{worker}}/commit", commit_many),
        route(f"{base}/attempts/{{attempt}}/fail", fail),
        route(f"{base}/jobs/{{job}}/logs/{{worker}}", append_log),
        route(f"{base}/jobs/{{job}}/health/{{worker}}", report_health),
    ]

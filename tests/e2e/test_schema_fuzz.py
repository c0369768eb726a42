"""Schemathesis against the public OpenAPI schema of a real server: no request gets a 5xx."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

import skybatch
from tests.helpers import Deployment, deployment_at, server

#: Examples per operation and generation mode: the whole run stays well under a minute.
EXAMPLES = 12
BUDGET_S = 90.0


@pytest.fixture
def fuzzed(tmp_path: Path) -> Iterator[Deployment]:
    with deployment_at(tmp_path / "home") as d:
        d.pool("p", workers=1, tmp=tmp_path)
        yield d


def bound(case: schemathesis.Case) -> None:
    """Keep the fuzz deployment small and quick: tiny pools, short waits."""
    if isinstance(case.query, dict) and "wait" in case.query:
        case.query["wait"] = 0
    body = case.body
    if not isinstance(body, dict):
        return
    if case.operation.label == "POST /v1/pools/{name}":
        spec = body.get("spec")
        if isinstance(spec, dict) and isinstance(spec.get("pool"), dict):
            spec["pool"]["workers"] = 1
    elif case.operation.label == "POST /v1/jobs" and "pool" in body:
        body["pool"] = "p"  # past the pool check, into the reader and writer specs


def test_no_request_from_the_schema_gets_a_5xx(fuzzed: Deployment) -> None:
    url, auth, _ = server(fuzzed)
    raw = httpx.get(f"{url}/v1/openapi.json", headers=auth).json()
    schema = schemathesis.openapi.from_dict(raw)
    failures: list[str] = []
    calls = 0
    deadline = time.monotonic() + BUDGET_S

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                nonlocal calls
                if time.monotonic() > deadline:
                    return
                bound(case)
                calls += 1
                response = case.call(base_url=url, headers=auth, timeout=30)
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} query={case.query!r} "
                        f"body={_short(case.body)} -> {response.status_code} "
                        f"{response.text[:200]}"
                    )

            try:
                run()
            except Unsatisfiable:
                # Nothing to get wrong (GET /v1/health has no parameters): no negative case.
                assert mode is GenerationMode.NEGATIVE, operation.label
    assert calls > 100
    assert not failures, "\n".join(failures[:20])
    # Any pool the fuzzing made is one worker; the fixture stops them all by PID.
    assert all(p.workers <= 1 for p in skybatch.pool_status())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 300 else text[:300] + "..."

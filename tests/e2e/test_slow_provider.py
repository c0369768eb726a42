"""A provider whose liveness check is slow (a network round trip) never stalls the server."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

import skybatch
from skybatch.pools.registry import TEST_PROVIDERS_ENV
from tests.helpers import deployment_at, server


@skybatch.remote_function
def double():
    for batch in skybatch.load():
        skybatch.save_results([{"n": r["n"] * 2} for r in batch])


def test_a_one_second_liveness_check_leaves_the_loop_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_PROVIDERS_ENV, "1")  # the client validates; the server inherits it
    with deployment_at(tmp_path / "home") as d:
        d.pool("slow", workers=2, extra="provider: {type: test, alive_delay: 1.0}\n")
        url, headers, _ = server(d)
        worst = 0.0
        with httpx.Client(base_url=url, headers=headers) as client:
            # Three seconds span three rounds of checks, each 1 s long per worker.
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                start = time.monotonic()
                assert client.get("/v1/health").status_code == 200
                assert client.get("/v1/pools/slow").json()["provider"] == "test"
                worst = max(worst, time.monotonic() - start)
                time.sleep(0.02)
        assert worst < 0.3, f"the server took {worst:.2f}s to answer while checks ran"
        # Leases and commits go on meanwhile.
        job = skybatch.Dataset.from_items([{"n": n} for n in range(6)]).map(
            double, pool_name="slow", batch_size=1
        )
        assert job.results() == [{"n": n * 2} for n in range(6)]

"""End-to-end fixtures: real deployments (server and agent processes) and object-storage
servers, each stopped by PID afterwards. Every test under ``tests/e2e/`` is marked
``e2e``, so ``-m "not e2e"`` leaves them out."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.storage_servers import GcsServer, S3Server, fake_gcs, seaweedfs
from tests.helpers import Deployment, deployment_at

# gcsfs reads this when imported (by any process: the tests, the server, agents):
# without it every bucket of the GCS emulator hangs 60 s on a namespace probe.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The hook sees the whole session's items, not only this directory's.
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A fresh deployment for one test."""
    with deployment_at(tmp_path / "home") as d:
        yield d


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A deployment with a 3-worker pool named ``pool``, shared by a module's tests."""
    with deployment_at(tmp_path_factory.mktemp("shared") / "home") as d:
        d.pool("pool", workers=3)
        yield d


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS for the session; the AWS environment variables point at it, so
    deployments started afterwards find it through the standard credential chain."""
    with (
        seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server,
        pytest.MonkeyPatch.context() as mp,
    ):
        for key, value in server.env().items():
            mp.setenv(key, value)
        yield server


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    """fake-gcs-server for the session, found through ``STORAGE_EMULATOR_HOST``."""
    with (
        fake_gcs(tmp_path_factory.mktemp("fake-gcs")) as server,
        pytest.MonkeyPatch.context() as mp,
    ):
        for key, value in server.env().items():
            mp.setenv(key, value)
        yield server

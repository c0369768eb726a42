"""The provider contract: what the server relies on, run against every provider.

A provider for a new place (SSH hosts, a Ray cluster) subclasses
:class:`ProviderContract` and supplies the ``provider`` fixture. Each test
starts a real agent pointed at a port where no server listens: it keeps
retrying there (for ``ORPHAN_TIMEOUT``), which is all a liveness check needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from skybatch.config import Home
from skybatch.errors import PoolError
from skybatch.pools.providers.base import Provider, WorkerLaunch
from skybatch.pools.providers.local import LocalProvider
from skybatch.pools.providers.testing import FlakyConfig, FlakyProvider
from skybatch.pools.spec import parse_pool_spec
from tests.helpers import wait_for

#: Nothing listens on the discard port: the agent's connection is refused, and it retries.
_NO_SERVER = "http://127.0.0.1:9"


def _agents() -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if "skybatch.agent" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE
    ]


class ProviderContract:
    @pytest.fixture
    def provider(self) -> Provider:
        raise NotImplementedError

    @pytest.fixture
    def home(self, tmp_path: Path) -> Iterator[Home]:
        home = Home(tmp_path / "home")
        home.root.mkdir(mode=0o700)
        yield home
        for agent in _agents():  # a failed test's agent, by pid
            agent.kill()

    def launch_spec(
        self, home: Home, index: int = 0, yaml: str = "pool: {workers: 1}\n"
    ) -> WorkerLaunch:
        return WorkerLaunch(
            worker_id=index + 1,
            pool="p",
            index=index,
            spec=parse_pool_spec(yaml),
            server_url=_NO_SERVER,
            token="t" * 32,
            home=home,
        )

    def test_launch_alive_terminate_dead(self, provider: Provider, home: Home) -> None:
        handle = provider.launch(self.launch_spec(home))
        assert provider.is_alive(handle)
        provider.terminate(handle, grace=5)
        assert not provider.is_alive(handle)
        assert _agents() == []

    def test_handle_survives_a_json_round_trip_and_a_new_provider(
        self, provider: Provider, home: Home
    ) -> None:
        handle = provider.launch(self.launch_spec(home))
        again = json.loads(json.dumps(handle))
        assert again == handle
        # As after a server restart: a fresh provider finds the agent by its handle alone.
        fresh = type(provider)(provider.config)
        assert fresh.is_alive(again)
        fresh.terminate(again, grace=5)
        assert not fresh.is_alive(again)
        assert not provider.is_alive(handle)

    def test_terminate_of_a_dead_agent_is_quiet(self, provider: Provider, home: Home) -> None:
        handle = provider.launch(self.launch_spec(home))
        provider.terminate(handle, grace=5)
        provider.terminate(handle, grace=5)
        assert not provider.is_alive(handle)

    def test_an_agent_that_dies_is_seen_dead(self, provider: Provider, home: Home) -> None:
        handle = provider.launch(self.launch_spec(home))
        (agent,) = _agents()
        agent.kill()
        wait_for(lambda: not provider.is_alive(handle), 10, "the killed agent seen dead")

    def test_remove_cleans_up(self, provider: Provider, home: Home) -> None:
        handles = [provider.launch(self.launch_spec(home, index=i)) for i in range(2)]
        assert home.pool_dir("p").is_dir()
        for handle in handles:
            provider.terminate(handle, grace=5)
        provider.remove("p", home)
        assert not home.pool_dir("p").exists()
        provider.remove("p", home)  # twice is harmless

    def test_a_bad_spec_fails_cleanly(self, provider: Provider, home: Home, tmp_path: Path) -> None:
        workdir = tmp_path / "code"
        workdir.mkdir()
        launch = self.launch_spec(home, yaml=f"pool: {{workers: 1}}\nworkdir: {workdir}\n")
        workdir.rmdir()  # gone between `pool apply` and the launch
        with pytest.raises(Exception) as e:
            provider.launch(launch)
        assert str(workdir) in str(e.value) and "\n" not in str(e.value)
        assert _agents() == []


class TestLocalProvider(ProviderContract):
    @pytest.fixture
    def provider(self) -> Provider:
        return LocalProvider()


class TestFlakyProvider(ProviderContract):
    @pytest.fixture
    def provider(self) -> Provider:
        return FlakyProvider(FlakyConfig(launch_delay=0.05, alive_delay=0.05))

    def test_a_failing_launch_starts_nothing(self, home: Home) -> None:
        provider = FlakyProvider(FlakyConfig(fail_launch="no capacity in zone x"))
        with pytest.raises(PoolError, match=r"^no capacity in zone x$"):
            provider.launch(self.launch_spec(home))
        assert _agents() == []

"""The provider contract: what the server relies on, run against every provider.

A provider for a new place (SSH hosts, a Ray cluster) subclasses
:class:`ProviderContract` and supplies the ``provider`` fixture. Each test
starts a real agent pointed at a port where no server listens: it keeps
retrying there (for ``ORPHAN_TIMEOUT``), which is all a liveness check needs.

Where its agents and files are not this process's children and this machine's
home, a subclass says so through hooks: ``setup`` (attach the provider, and any
fresh one a test makes from its config, as the server would), ``agents`` (the live
agents started for the test's home) and ``pool_files`` (where pool ``p``'s files
lie); ``teardown`` releases what ``setup`` gave, after each test, whatever happened.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from skybatch.config import Home
from skybatch.errors import PoolError
from skybatch.pools.providers.base import Provider, ServerAccess, WorkerLaunch
from skybatch.pools.providers.local import LocalProvider
from skybatch.pools.providers.testing import FlakyConfig, FlakyProvider
from skybatch.pools.spec import parse_pool_spec
from tests.helpers import wait_for

__all__ = ["NO_SERVER", "TOKEN", "ProviderContract"]

#: Nothing listens on the discard port: the agent's connection is refused, and it retries.
NO_SERVER = "http://127.0.0.1:9"
TOKEN = "t" * 32


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
        for agent in self.agents(home):  # a failed test's agent, by pid
            agent.kill()

    @pytest.fixture(autouse=True)
    def _attached(self, provider: Provider, home: Home) -> Iterator[None]:
        self._set_up: list[Provider] = []
        self.attach(provider, home)
        yield
        for made in reversed(self._set_up):
            self.teardown(made, home)

    # -- the hooks -----------------------------------------------------------------------

    def setup(self, provider: Provider, home: Home) -> None:
        """Before ``provider``'s first call: what the server does after making one."""
        return None

    def teardown(self, provider: Provider, home: Home) -> None:
        """After the test, for each provider ``setup`` saw: release what it holds."""
        return None

    def agents(self, home: Home) -> list[psutil.Process]:
        """The live agents started for ``home`` (this test's: not another test's)."""
        return _agents()

    def pool_files(self, home: Home) -> Path | None:
        """Where pool ``p``'s worker files lie (None: nowhere this test can look)."""
        return home.pool_dir("p")

    # -- for the tests -------------------------------------------------------------------

    def attach(self, provider: Provider, home: Home) -> Provider:
        self._set_up.append(provider)
        self.setup(provider, home)
        return provider

    @staticmethod
    def access(home: Home) -> ServerAccess:
        """What a provider is attached to: a server that does not listen."""
        return ServerAccess(NO_SERVER, TOKEN, home)

    def launch_spec(
        self, home: Home, index: int = 0, yaml: str = "pool: {workers: 1}\n"
    ) -> WorkerLaunch:
        return WorkerLaunch(
            worker_id=index + 1,
            pool="p",
            index=index,
            spec=parse_pool_spec(yaml),
            server_url=NO_SERVER,
            token=TOKEN,
            home=home,
        )

    # -- the contract --------------------------------------------------------------------

    def test_launch_alive_terminate_dead(self, provider: Provider, home: Home) -> None:
        handle = provider.launch(self.launch_spec(home))
        assert provider.is_alive(handle)
        assert len(self.agents(home)) == 1
        provider.terminate(handle, grace=5)
        assert not provider.is_alive(handle)
        assert self.agents(home) == []

    def test_handle_survives_a_json_round_trip_and_a_new_provider(
        self, provider: Provider, home: Home
    ) -> None:
        handle = provider.launch(self.launch_spec(home))
        again = json.loads(json.dumps(handle))
        assert again == handle
        # As after a server restart: a fresh provider finds the agent by its handle alone.
        fresh = self.attach(type(provider)(provider.config), home)
        assert fresh.is_alive(again)
        fresh.terminate(again, grace=5)
        assert not fresh.is_alive(again)
        assert not provider.is_alive(handle)
        assert self.agents(home) == []

    def test_terminate_of_a_dead_agent_is_quiet(self, provider: Provider, home: Home) -> None:
        handle = provider.launch(self.launch_spec(home))
        provider.terminate(handle, grace=5)
        provider.terminate(handle, grace=5)
        assert not provider.is_alive(handle)

    def test_an_agent_that_dies_is_seen_dead(self, provider: Provider, home: Home) -> None:
        handle = provider.launch(self.launch_spec(home))
        (agent,) = self.agents(home)
        agent.kill()
        wait_for(lambda: not provider.is_alive(handle), 10, "the killed agent seen dead")

    def test_remove_cleans_up(self, provider: Provider, home: Home) -> None:
        handles = [provider.launch(self.launch_spec(home, index=i)) for i in range(2)]
        files = self.pool_files(home)
        assert files is None or files.is_dir()
        for handle in handles:
            provider.terminate(handle, grace=5)
        # Everything was reached: nothing left to report.
        assert provider.remove("p", home) == []
        assert files is None or not files.exists()
        provider.remove("p", home)  # twice is harmless

    def test_a_bad_spec_fails_cleanly(self, provider: Provider, home: Home, tmp_path: Path) -> None:
        workdir = tmp_path / "code"
        workdir.mkdir()
        launch = self.launch_spec(home, yaml=f"pool: {{workers: 1}}\nworkdir: {workdir}\n")
        workdir.rmdir()  # gone between `pool apply` and the launch
        with pytest.raises(Exception) as e:
            provider.launch(launch)
        assert str(workdir) in str(e.value) and "\n" not in str(e.value)
        assert self.agents(home) == []


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
        assert self.agents(home) == []

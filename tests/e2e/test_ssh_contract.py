"""The provider contract (tests/contract/test_providers.py) on the SSH provider: agents on
two hosts, network namespaces with their own sshd (tests/e2e/hosts.py).

The hosts share this machine's files, so the remote dir is a local path the test can
look at, and their processes are this machine's, so the agents are found (and killed)
by pid in the hosts' namespaces.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from skybatch.config import Home
from skybatch.pools.providers.base import Provider
from skybatch.pools.providers.ssh import SshProvider
from skybatch.pools.providers.ssh.config import SshConfig
from tests.contract.test_providers import ProviderContract
from tests.e2e.hosts import Hosts, ssh_hosts


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    with ssh_hosts(tmp_path_factory.mktemp("ssh") / "hosts", 2) as hosts:
        yield hosts


class TestSshProvider(ProviderContract):
    @pytest.fixture
    def provider(self, hosts: Hosts) -> Provider:
        self.hosts = hosts
        self.remote = hosts.root.parent / "remote"
        return SshProvider(
            SshConfig(
                hosts=[h.alias for h in hosts.hosts],
                ssh_config=str(hosts.ssh_config),
                # The test's own interpreter, which the hosts see: nothing to ship.
                python=sys.executable,
                remote_dir=str(self.remote),
            )
        )

    def setup(self, provider: Provider, home: Home) -> None:
        # Tunnels and liveness checks need the server's port, given by attach; a
        # fresh provider's attach also kills the ssh processes its predecessor
        # recorded, as a restarted server does.
        provider.attach(self.access(home))

    def teardown(self, provider: Provider, home: Home) -> None:
        provider.close()

    def agents(self, home: Home) -> list[psutil.Process]:
        remote_home = str(self.remote / home.deployment_id())
        found = []
        for host in self.hosts.hosts:
            for proc in self.hosts.processes(host):
                with contextlib.suppress(psutil.Error):  # exiting meanwhile
                    if (
                        "skybatch.agent" in " ".join(proc.cmdline())
                        and proc.status() != psutil.STATUS_ZOMBIE
                        and proc.environ().get("SKYBATCH_HOME") == remote_home
                    ):
                        found.append(proc)
        return found

    def pool_files(self, home: Home) -> Path | None:
        return self.remote / home.deployment_id() / "pools" / "p"

"""The ``test`` provider: local agents, with slowness and failures on demand.

Offered only when ``SKYBATCH_TEST_PROVIDERS=1`` (see the registry), so the
tests can stand in for a provider whose calls cross a network (SSH, Ray)
while running real agents::

    provider: {type: test, alive_delay: 1.0}
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

from pydantic import Field

from skybatch.errors import PoolError
from skybatch.pools.providers.base import WorkerLaunch
from skybatch.pools.providers.local import LocalProvider
from skybatch.pools.registry import ProviderConfig

__all__ = ["FlakyConfig", "FlakyProvider"]

#: ``sh -c _HIDE <count> <path>... <command>...``, run in the worker directory: an empty
#: tmpfs over each path, then the worker directory bound back at its own path (through
#: the cwd, which still reaches it) and entered, and the command exec'd.
_HIDE = (
    'n="$0"; while [ "$n" -gt 0 ]; do '
    'mount -t tmpfs -o mode=0700,size=1m skybatch-hide "$1" || exit 97; shift; n=$((n-1)); done; '
    'wd="$PWD"; mkdir -p "$wd" && mount --no-canonicalize --bind . "$wd" && cd "$wd" '
    '|| exit 97; exec "$@"'
)


class FlakyConfig(ProviderConfig):
    type: Literal["test"] = "test"
    #: Seconds each call sleeps before doing its work.
    launch_delay: float = Field(default=0.0, ge=0, le=60)
    alive_delay: float = Field(default=0.0, ge=0, le=60)
    terminate_delay: float = Field(default=0.0, ge=0, le=60)
    #: When set, launches fail with this message (those of workers from ``fail_from`` on).
    fail_launch: str | None = None
    #: Only workers of this index and above fail to launch: the first ones start.
    fail_from: int = Field(default=0, ge=0)
    #: Agents run with ``SKYBATCH_RELAY=1``, as an SSH or Ray provider's do: the server
    #: relays local-path inputs and outputs (``shares_files`` is then False).
    relay: bool = False
    #: Absolute paths the agents must not see: each lies under an empty tmpfs in a mount
    #: namespace of the agent's own (its worker directory is bound back), so an agent
    #: that reads or writes there instead of through the relay fails.
    hide: list[str] = Field(default_factory=list, max_length=16)
    #: A command (argv) run in place of the agent, with its environment and the token on
    #: its stdin; it gets the agent's own command line after ``--``, to ignore. The
    #: benchmark's fake agents (``bench/fake_agent.py``) load the server this way.
    agent_command: list[str] | None = Field(default=None, min_length=1, max_length=64)


class FlakyProvider(LocalProvider):
    config_model = FlakyConfig

    def __init__(self, config: ProviderConfig | None = None) -> None:
        super().__init__(config or FlakyConfig())
        assert isinstance(self.config, FlakyConfig)
        self.flaky: FlakyConfig = self.config

    @property
    def shares_files(self) -> bool:  # type: ignore[override]
        return not self.flaky.relay

    def agent_env(self, worker: WorkerLaunch) -> dict[str, str]:
        return {"SKYBATCH_RELAY": "1"} if self.flaky.relay else {}

    def agent_prefix(self, worker: WorkerLaunch) -> list[str]:
        replaced = [*self.flaky.agent_command, "--"] if self.flaky.agent_command else []
        if not self.flaky.hide:
            return replaced
        if any(not os.path.isabs(p) for p in self.flaky.hide):
            raise PoolError(f"provider.hide takes absolute paths, got {self.flaky.hide}")
        ns = ["--mount", "--propagation", "private"]
        if os.geteuid() != 0:
            ns = ["--map-root-user", "--mount"]  # mount needs root in a user namespace
        return [
            "unshare",
            *ns,
            "--",
            "sh",
            "-c",
            _HIDE,
            str(len(self.flaky.hide)),
            *self.flaky.hide,
            *replaced,
        ]

    def launch(self, worker: WorkerLaunch) -> dict[str, Any]:
        time.sleep(self.flaky.launch_delay)
        if self.flaky.fail_launch is not None and worker.index >= self.flaky.fail_from:
            raise PoolError(self.flaky.fail_launch)
        return super().launch(worker)

    def is_alive(self, handle: dict[str, Any]) -> bool:
        time.sleep(self.flaky.alive_delay)
        return super().is_alive(handle)

    def terminate(self, handle: dict[str, Any], grace: float) -> None:
        time.sleep(self.flaky.terminate_delay)
        super().terminate(handle, grace)

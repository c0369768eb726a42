"""The provider interface: where a pool's workers run.

A provider starts one agent per worker and can tell whether it still lives.
The server never knows which provider it talks to; ``local`` is the default,
and Ray or SSH providers implement the same four methods. They are plain
blocking calls: the server runs each in a thread, so a slow one (a network
round trip) never holds up its event loop.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

from skybatch.config import Home
from skybatch.pools.registry import ProviderConfig, provider_class
from skybatch.pools.spec import PoolSpec

__all__ = ["Provider", "WorkerLaunch", "provider_for"]


@dataclass(frozen=True)
class WorkerLaunch:
    """Everything a provider needs to start one worker's agent."""

    worker_id: int
    pool: str
    index: int
    spec: PoolSpec
    server_url: str
    token: str
    home: Home


class Provider(abc.ABC):
    #: The fields this provider's ``provider:`` mapping takes, validated at `pool apply`.
    config_model: ClassVar[type[ProviderConfig]]

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def launch(self, worker: WorkerLaunch) -> dict[str, Any]:
        """Start the worker's agent; return a JSON handle that finds it again after a restart."""

    @abc.abstractmethod
    def is_alive(self, handle: dict[str, Any]) -> bool:
        """Whether the agent behind ``handle`` still runs. Called twice a second per worker."""

    @abc.abstractmethod
    def terminate(self, handle: dict[str, Any], grace: float) -> None:
        """Stop the agent and its runners: politely, then by force after ``grace`` seconds."""

    @abc.abstractmethod
    def remove(self, pool: str, home: Home) -> None:
        """Delete what the pool left behind (worker directories) after it went down."""


def provider_for(config: ProviderConfig) -> Provider:
    """A provider for a pool's validated ``provider:`` section."""
    cls = provider_class(config.type)
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise TypeError(f"the registry's entry for {config.type!r} is not a Provider")
    return cls(config)

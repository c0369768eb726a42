"""The provider interface: where a pool's workers run.

A provider starts one agent per worker and can tell whether it still lives.
The server never knows which provider it talks to; ``local`` is the default,
and Ray or SSH providers implement the same four methods. They are plain
blocking calls: the server runs each in a thread, so a slow one (a network
round trip) never holds up its event loop.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from skybatch.config import Home
from skybatch.pools.gpus import GpuLedger, Held
from skybatch.pools.registry import ProviderConfig, provider_class
from skybatch.pools.spec import PoolSpec

__all__ = ["Provider", "ServerAccess", "WorkerLaunch", "provider_for"]


@dataclass(frozen=True)
class ServerAccess:
    """How agents reach this server; given to a provider once, right after it is made.

    A provider that keeps tunnels or connections (SSH) re-opens them from this after
    a server restart, before any launch; ``cert`` is the PEM of the server's TLS
    certificate when it serves HTTPS (agents trust that certificate and nothing else).
    """

    url: str
    token: str
    home: Home
    cert: str | None = None


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
    #: The PEM of the server's certificate when it serves HTTPS (see ServerAccess).
    server_cert: str | None = None
    #: Who holds which GPUs on every host; a pool with ``accelerators`` claims this
    #: worker's from it (``GpuLedger.claim``) and puts them in the handle's ``gpus``.
    gpus: GpuLedger = field(default_factory=GpuLedger)


class Provider(abc.ABC):
    """Where a pool's workers run.

    A handle returned by ``launch`` is JSON kept in the store; besides what the
    provider needs, it carries ``host`` (where the worker runs, shown by `pool
    status`) and ``gpus`` (the GPU indices given to it, a list, empty for none).
    """

    #: The fields this provider's ``provider:`` mapping takes, validated at `pool apply`.
    config_model: ClassVar[type[ProviderConfig]]
    #: Whether agents see the server's local files. When not, the provider starts its
    #: agents with ``SKYBATCH_RELAY=1``: the server relays local-path inputs and outputs.
    shares_files: ClassVar[bool] = True

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.access: ServerAccess | None = None

    def attach(self, access: ServerAccess) -> None:
        """Called once, before any other call: how agents reach the server."""
        self.access = access

    def check(self, spec: PoolSpec, held: Held | None = None) -> None:
        """Raise PoolSpecError, one line naming the field or host, when ``spec`` cannot
        run here (an unreachable host, too few GPUs). Called at `pool apply`, in a thread.

        ``held``: the GPUs other pools' live workers hold (``held.on(host, gpus)`` is
        what ``gpus.check_fits`` takes for one host)."""
        return None

    def close(self) -> None:
        """Release what the provider holds (tunnels, connections): the server is stopping,
        after it stopped the agents. (After a crash, agents outlive the server; the next
        one finds them again by their handles.)"""
        return None

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
    def remove(self, pool: str, home: Home) -> list[str]:
        """Delete what the pool left behind (worker directories) after it went down;
        what could not be stopped or deleted (a host out of reach), one line each, for
        the user who took the pool down."""


def provider_for(config: ProviderConfig) -> Provider:
    """A provider for a pool's validated ``provider:`` section."""
    cls = provider_class(config.type)
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise TypeError(f"the registry's entry for {config.type!r} is not a Provider")
    return cls(config)

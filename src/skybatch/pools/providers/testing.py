"""The ``test`` provider: local agents, with slowness and failures on demand.

Offered only when ``SKYBATCH_TEST_PROVIDERS=1`` (see the registry), so the
tests can stand in for a provider whose calls cross a network (SSH, Ray)
while running real agents::

    provider: {type: test, alive_delay: 1.0}
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from skybatch.errors import PoolError
from skybatch.pools.providers.base import WorkerLaunch
from skybatch.pools.providers.local import LocalProvider
from skybatch.pools.registry import ProviderConfig

__all__ = ["FlakyConfig", "FlakyProvider"]


class FlakyConfig(ProviderConfig):
    type: Literal["test"] = "test"
    #: Seconds each call sleeps before doing its work.
    launch_delay: float = Field(default=0.0, ge=0, le=60)
    alive_delay: float = Field(default=0.0, ge=0, le=60)
    terminate_delay: float = Field(default=0.0, ge=0, le=60)
    #: When set, every launch fails with this message.
    fail_launch: str | None = None


class FlakyProvider(LocalProvider):
    config_model = FlakyConfig

    def __init__(self, config: ProviderConfig | None = None) -> None:
        super().__init__(config or FlakyConfig())
        assert isinstance(self.config, FlakyConfig)
        self.flaky: FlakyConfig = self.config

    def launch(self, worker: WorkerLaunch) -> dict[str, Any]:
        time.sleep(self.flaky.launch_delay)
        if self.flaky.fail_launch is not None:
            raise PoolError(self.flaky.fail_launch)
        return super().launch(worker)

    def is_alive(self, handle: dict[str, Any]) -> bool:
        time.sleep(self.flaky.alive_delay)
        return super().is_alive(handle)

    def terminate(self, handle: dict[str, Any], grace: float) -> None:
        time.sleep(self.flaky.terminate_delay)
        super().terminate(handle, grace)

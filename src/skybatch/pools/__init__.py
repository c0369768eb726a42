"""Worker pools: the pool YAML and the providers that run workers."""

from __future__ import annotations

from skybatch.pools.base import Provider

__all__ = ["Provider", "provider_for"]


def provider_for(name: str) -> Provider:
    """The provider called ``name``; optional ones load only when asked for."""
    if name == "local":
        from skybatch.pools.local import LocalProvider

        return LocalProvider()
    raise ValueError(f"unknown provider {name!r}; available: local")

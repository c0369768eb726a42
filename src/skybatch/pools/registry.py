"""Provider names to implementations, loaded only when a pool names them.

To add a provider: write ``providers/<name>.py`` with a ``Provider``
subclass whose ``config_model`` declares the fields its ``provider:`` mapping
takes, and add an entry to ``_BUILTIN`` (with the pip extra that brings its
dependencies, if it has any). The registry imports the module by name, so an
optional provider's dependencies are imported only by pools that use it. It
sits beside ``spec.py``, not in ``providers/``, and names no provider module in
an import statement: the pool YAML model validates through it, and the
providers import that model, so either would close an import circle.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["TEST_PROVIDERS_ENV", "ProviderConfig", "known", "parse_config", "provider_class"]

#: Set to 1 (by the tests only) to offer the ``test`` provider (``providers/testing.py``).
TEST_PROVIDERS_ENV = "SKYBATCH_TEST_PROVIDERS"


class ProviderConfig(BaseModel):
    """The ``provider:`` section of a pool YAML; each provider extends it with its fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str


@dataclass(frozen=True)
class _Entry:
    module: str
    cls: str
    #: The ``skybatch[...]`` extra that installs the provider's dependencies.
    extra: str | None = None


_BUILTIN: dict[str, _Entry] = {
    "local": _Entry("skybatch.pools.providers.local", "LocalProvider"),
    "ray": _Entry("skybatch.pools.providers.ray", "RayProvider", extra="ray"),
    # The system's OpenSSH client does the work: no Python dependency to install.
    "ssh": _Entry("skybatch.pools.providers.ssh", "SshProvider"),
}
_TESTING = {"test": _Entry("skybatch.pools.providers.testing", "FlakyProvider")}


def _entries() -> dict[str, _Entry]:
    if os.environ.get(TEST_PROVIDERS_ENV) == "1":
        return {**_BUILTIN, **_TESTING}
    return _BUILTIN


def known() -> list[str]:
    return list(_entries())


def provider_class(name: str) -> Any:
    """The provider class called ``name`` (a ``Provider`` subclass); ValueError says why not.

    Typed ``Any`` because naming ``Provider`` here would close an import circle
    (providers/base.py imports the pool YAML model, which validates through here).
    """
    entry = _entries().get(name)
    if entry is None:
        alternatives = " or ".join(repr(n) for n in known())
        # "Input should be ..." is pydantic's own wording for a closed set of values.
        raise ValueError(f"Input should be {alternatives} (the providers known here), not {name!r}")
    try:
        module = importlib.import_module(entry.module)
    except ModuleNotFoundError as e:
        if entry.extra is None:
            raise
        raise ValueError(
            f"provider {name!r} needs {e.name!r}, which is not installed: "
            f"pip install 'skybatch[{entry.extra}]'"
        ) from None
    return getattr(module, entry.cls)


def parse_config(value: Any) -> ProviderConfig:
    """``provider: NAME`` or ``provider: {type: NAME, ...}``, validated by that provider's model."""
    if isinstance(value, ProviderConfig):
        return value
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict):
        raise ValueError(
            "expected a provider name such as local, or a mapping such as {type: local}"
        )
    name = value.get("type")
    if not isinstance(name, str):
        raise ValueError("a provider mapping needs `type:`, the provider's name (such as local)")
    model: type[ProviderConfig] = provider_class(name).config_model
    return model.model_validate(value)

"""The provider registry and each provider's `provider:` section in the pool YAML."""

from __future__ import annotations

import pytest

from skybatch.errors import PoolSpecError
from skybatch.pools import registry
from skybatch.pools.providers.base import provider_for
from skybatch.pools.providers.local import LocalConfig, LocalProvider
from skybatch.pools.providers.testing import FlakyConfig, FlakyProvider
from skybatch.pools.spec import PoolSpec, parse_pool_spec, validate_pool_spec

_POOL = "pool:\n  workers: 1\n"


@pytest.fixture
def with_test_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.TEST_PROVIDERS_ENV, "1")


def _error(text: str) -> str:
    with pytest.raises(PoolSpecError) as e:
        parse_pool_spec(_POOL + text, "pool.yaml")
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("text", ["", "provider: local\n", "provider: {type: local}\n"])
def test_string_and_mapping_forms_are_one_config(text: str) -> None:
    spec = parse_pool_spec(_POOL + text)
    assert spec.provider == "local"
    assert spec.provider_config == LocalConfig()
    assert isinstance(provider_for(spec.provider_config), LocalProvider)


def test_a_spec_survives_the_wire_and_the_store() -> None:
    spec = parse_pool_spec(_POOL + "provider: {type: local}\n")
    assert spec.model_dump()["provider"] == {"type": "local"}
    assert PoolSpec.model_validate(spec.model_dump()) == spec
    # Pools stored before providers had fields spelled it as a string.
    assert PoolSpec.model_validate({"pool": {"workers": 1}, "provider": "local"}) == spec


def test_unknown_name_names_the_known_ones() -> None:
    assert _error("provider: aws\n") == (
        "pool.yaml line 3: provider: Input should be 'local' or 'ray' or 'ssh' (the providers "
        "known here), not 'aws'"
    )
    assert "not 'aws'" in _error("provider: {type: aws}\n")


def test_the_test_provider_is_offered_only_when_asked_for(with_test_provider: None) -> None:
    assert registry.known() == ["local", "ray", "ssh", "test"]
    assert "Input should be 'local' or 'ray' or 'ssh' or 'test'" in _error("provider: aws\n")
    spec = parse_pool_spec(_POOL + "provider: {type: test, alive_delay: 1.5}\n")
    assert spec.provider_config == FlakyConfig(alive_delay=1.5)
    assert isinstance(provider_for(spec.provider_config), FlakyProvider)


def test_unknown_fields_are_named_with_what_is_allowed(with_test_provider: None) -> None:
    assert _error("provider:\n  type: local\n  hosts: [a]\n") == (
        "pool.yaml line 5: unknown field 'provider.hosts'; allowed here: type"
    )
    assert "unknown field 'provider.alive'; allowed here: type, launch_delay, alive_delay" in (
        _error("provider: {type: test, alive: 1}\n")
    )
    assert "provider.alive_delay: Input should be greater than or equal to 0" in _error(
        "provider: {type: test, alive_delay: -1}\n"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("provider: {hosts: [a]}\n", "provider: a provider mapping needs `type:`"),
        ("provider: [local]\n", "provider: expected a provider name such as local, or a mapping"),
    ],
)
def test_malformed_sections(text: str, message: str) -> None:
    assert message in _error(text)


def test_an_optional_provider_without_its_packages_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What `provider: ray` looks like where Ray is not installed: its module cannot import.
    entry = registry._Entry("skybatch_tests_absent_ray_provider", "RayProvider", extra="ray")
    monkeypatch.setitem(registry._BUILTIN, "ray", entry)
    assert _error("provider: ray\n") == (
        "pool.yaml line 3: provider: provider 'ray' needs 'skybatch_tests_absent_ray_provider', "
        "which is not installed: pip install 'skybatch[ray]'"
    )


def test_a_spec_from_the_api_names_the_field() -> None:
    with pytest.raises(PoolSpecError) as e:
        validate_pool_spec({"pool": {"workers": 1}, "provider": {"type": "local", "x": 1}}, "api")
    assert str(e.value) == "api: unknown field 'provider.x'; allowed here: type"

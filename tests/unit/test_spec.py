"""Pool YAML validation: values normalised, errors name file, line, field and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from skybatch.errors import PoolSpecError
from skybatch.pools.spec import load_pool_file, parse_pool_spec


def test_full_spec_normalises() -> None:
    spec = parse_pool_spec(
        "pool:\n  workers: 3\nresources:\n  cpus: 2+\n  memory: 16GB+\n  accelerators: L4\n"
        "setup: pip install x\nenvs:\n  A: 1\n  B: text\n"
    )
    assert spec.workers == 3
    assert (spec.resources.cpus, spec.resources.memory) == ("2+", "16+")
    assert spec.resources.accelerators == "L4:1" and spec.resources.accelerator_count() == 1
    assert spec.envs == {"A": "1", "B": "text"}
    assert spec.provider == "local"


@pytest.mark.parametrize("value", ["2", 2, "2+", "0.5", "1.50+"])
def test_cpu_forms(value: object) -> None:
    spec = parse_pool_spec(f"pool: {{workers: 1}}\nresources: {{cpus: '{value}'}}\n")
    assert spec.resources.cpus is not None


def test_accelerators_as_mapping() -> None:
    spec = parse_pool_spec("pool: {workers: 1}\nresources:\n  accelerators: {A100: 8}\n")
    assert spec.resources.accelerators == "A100:8"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "pool:\n  workers: 2\nsetpu: x\n",
            "line 3: unknown field 'setpu'; allowed here: pool, resources, setup, envs, workdir",
        ),
        (
            "pool:\n  workers: 2\nresources:\n  gpus: 1\n",
            "line 4: unknown field 'resources.gpus'; allowed here: cpus, memory, accelerators",
        ),
        ("pool:\n  workers: two\n", "line 2: pool.workers: Input should be a valid integer"),
        (
            "pool:\n  workers: 1\nresources:\n  memory: -4\n",
            "resources.memory: expected memory in GB",
        ),
        ("pool:\n  workers: 1\nprovider: aws\n", "line 3: provider: Input should be 'local'"),
        ("pool:\n  workers: 1\nenvs:\n  1BAD: x\n", "envs: '1BAD' is not a valid environment"),
        ("- a\n- b\n", "expected a mapping with at least `pool: {workers: N}`"),
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(PoolSpecError) as e:
        parse_pool_spec(text, "pool.yaml")
    assert str(e.value).startswith("pool.yaml")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PoolSpecError, match="no such file"):
        load_pool_file(tmp_path / "nope.yaml")


def test_workdir_resolves_against_the_yaml_file(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "pool.yaml").write_text("pool: {workers: 1}\nworkdir: code\n")
    assert load_pool_file(tmp_path / "pool.yaml").workdir == str(tmp_path / "code")


def test_setup_hash_changes_with_text_and_envs() -> None:
    a = parse_pool_spec("pool: {workers: 1}\nsetup: x\n")
    b = parse_pool_spec("pool: {workers: 5}\nsetup: x\n")
    c = parse_pool_spec("pool: {workers: 1}\nsetup: y\n")
    d = parse_pool_spec("pool: {workers: 1}\nsetup: x\nenvs: {K: v}\n")
    assert a.setup_hash() == b.setup_hash()
    assert len({a.setup_hash(), c.setup_hash(), d.setup_hash()}) == 3

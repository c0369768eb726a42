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


# -- SkyPilot task fields ---------------------------------------------------------------

_MACHINES = (
    "skybatch does not provision machines; launch them with `sky launch` and list them "
    "as SSH hosts (provider: {type: ssh, hosts: [...]})"
)


def test_skypilot_task_fields_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text("a\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "pool.yaml").write_text(
        "name: my-pool\n"
        "num_nodes: 3\n"
        "resources:\n"
        "  cloud: aws\n"
        "  use_spot: true\n"
        "  cpus: 2+\n"
        "  infra: aws/us-east-1\n"
        "  instance_type: m5.large\n"
        "  disk_size: 100\n"
        "file_mounts:\n"
        "  vocab.txt: vocab.txt\n"
        "  ~/models: ./models\n"
        "  /bucket: s3://my-bucket/data\n"
        "run: python main.py\n"
    )
    spec = load_pool_file(tmp_path / "pool.yaml")
    assert (spec.name, spec.workers, spec.autoscaled) == ("my-pool", 3, False)
    assert spec.resources.cpus == "2+"
    assert spec.file_mounts == {
        "vocab.txt": str(tmp_path / "vocab.txt"),
        "~/models": str(tmp_path / "models"),
    }
    where = f"{tmp_path / 'pool.yaml'} line"
    assert spec.warnings == (
        f"Warning: {where} 4: resources.cloud is ignored: {_MACHINES}",
        f"Warning: {where} 5: resources.use_spot is ignored: {_MACHINES}",
        f"Warning: {where} 7: resources.infra is ignored: {_MACHINES}",
        f"Warning: {where} 8: resources.instance_type is ignored: {_MACHINES}",
        f"Warning: {where} 9: resources.disk_size is ignored: {_MACHINES}",
        f"Warning: {where} 13: file_mounts./bucket is ignored: skybatch copies local paths "
        "only; read the bucket from the mapper (or make it the dataset's input)",
        f"Warning: {where} 14: run is ignored: a pool's workers run the mappers that ds.map "
        "submits; put per-worker commands in setup",
    )
    # The name picks no workers' restart; the mounts do.
    other = spec.model_copy(update={"name": "other"})
    assert other.runtime_key() == spec.runtime_key()
    assert "name" in spec.model_dump() and spec.model_dump()["name"] == "my-pool"


def test_a_plain_spec_has_no_warnings() -> None:
    spec = parse_pool_spec("pool: {workers: 1}\n")
    assert (spec.warnings, spec.name, spec.file_mounts) == ((), None, {})


@pytest.mark.parametrize(
    "text", ["num_nodes: 2\n", "pool: {workers: 2}\nnum_nodes: 2\n", "num_nodes: 2\npool: {}\n"]
)
def test_num_nodes_is_pool_workers(text: str) -> None:
    assert parse_pool_spec(text).workers == 2


def test_file_mounts_are_dropped_with_a_warning_where_the_provider_does_not_copy(
    tmp_path: Path,
) -> None:
    spec = parse_pool_spec(
        "pool: {workers: 1}\nprovider: {type: ray}\nfile_mounts:\n  data: .\n",
        "pool.yaml",
        str(tmp_path),
    )
    assert spec.file_mounts == {}
    assert spec.warnings == (
        "Warning: pool.yaml line 3: file_mounts is ignored: provider ray does not copy "
        "file_mounts; put the files in workdir, which it copies to each worker",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "pool: {workers: 2}\nnum_nodes: 3\n",
            "pool.yaml line 2: num_nodes: 3, but pool.workers is 2; they are the same "
            "setting: give one of them",
        ),
        (
            "pool: {max_workers: 4}\nnum_nodes: 3\n",
            "pool.yaml line 2: num_nodes: a fixed size, not with pool.min_workers/max_workers; "
            "drop num_nodes for an autoscaled pool",
        ),
        (
            "num_nodes: 0\n",
            "pool.yaml line 1: num_nodes: expected a number of workers from 1 to 4096, got 0",
        ),
        (
            "num_nodes: 1\nfile_mounts:\n  /data: .\n",
            "pool.yaml line 2: file_mounts: /data is absolute; a "
            "local pool writes only inside each worker's directory: give a relative target "
            "(or ~/...), which lands there, where the mapper runs",
        ),
        (
            "num_nodes: 1\nfile_mounts:\n  ../up: .\n",
            "pool.yaml line 2: file_mounts: ../up: a target may not contain '..'",
        ),
        (
            "num_nodes: 1\nfile_mounts:\n  data: ./nowhere\n",
            "pool.yaml line 3: file_mounts.data: /base/nowhere does not exist; name a local "
            "file or directory to copy to each worker",
        ),
        (
            "num_nodes: 1\nname: bad name\n",
            "pool.yaml line 2: name: invalid 'bad name': use letters",
        ),
    ],
)
def test_skypilot_field_errors(text: str, message: str) -> None:
    with pytest.raises(PoolSpecError) as e:
        parse_pool_spec(text, "pool.yaml", "/base")
    assert message in str(e.value)
    assert "\n" not in str(e.value)

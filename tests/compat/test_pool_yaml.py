"""A SkyPilot-style pool YAML (a SkyPilot task) applies as it is on a local pool: its
fields with a meaning here are used, the others warned about on stderr, one line each."""

from __future__ import annotations

from pathlib import Path

import skybatch
from tests.helpers import Deployment, read_jsonl, write_jsonl

_MACHINES = (
    "skybatch does not provision machines; launch them with `sky launch` and list them "
    "as SSH hosts (provider: {type: ssh, hosts: [...]})"
)


@skybatch.remote_function
def tag_with_mounted_file():
    # Relative and ~/ targets land in the worker's directory, the mapper's cwd.
    with open("data/suffix.txt") as f:
        suffix = f.read().strip()
    with open("extra/more.txt") as f:
        more = f.read().strip()
    for batch in skybatch.load():
        skybatch.save_results([{"text": item["text"] + suffix + more} for item in batch])


def test_skypilot_pool_yaml_applies_with_warnings(deployment: Deployment, tmp_path: Path) -> None:
    (tmp_path / "suffix.txt").write_text("-mounted\n")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "more.txt").write_text("+dir\n")
    yaml_path = tmp_path / "pool.yaml"
    yaml_path.write_text(
        "name: sky-pool\n"
        "num_nodes: 2\n"
        "resources:\n"
        "  cpus: 1+\n"
        "  cloud: aws\n"
        "  use_spot: true\n"
        "  instance_type: m5.large\n"
        "  disk_size: 64\n"
        "  infra: aws/us-east-1\n"
        "file_mounts:\n"
        "  data/suffix.txt: suffix.txt\n"
        "  ~/extra: ./extra\n"
        "setup: echo ready\n"
        "run: python main.py\n"
    )
    # No -p: the task's `name:` names the pool.
    proc = deployment.cli("pool", "apply", str(yaml_path), "-y")
    assert proc.returncode == 0
    assert "Successfully created pool 'sky-pool'." in proc.stdout.splitlines()
    where = f"{yaml_path} line"
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("Warning: ")]
    assert warnings == [
        f"Warning: {where} 5: resources.cloud is ignored: {_MACHINES}",
        f"Warning: {where} 6: resources.use_spot is ignored: {_MACHINES}",
        f"Warning: {where} 7: resources.instance_type is ignored: {_MACHINES}",
        f"Warning: {where} 8: resources.disk_size is ignored: {_MACHINES}",
        f"Warning: {where} 9: resources.infra is ignored: {_MACHINES}",
        f"Warning: {where} 14: run is ignored: a pool's workers run the mappers that ds.map "
        "submits; put per-worker commands in setup",
    ]
    (view,) = skybatch.pool_status("sky-pool")
    assert (view.workers, view.ready) == (2, 2)

    data = write_jsonl(tmp_path / "in.jsonl", [{"text": f"r{i}"} for i in range(4)])
    out = tmp_path / "out.jsonl"
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        tag_with_mounted_file,
        pool_name="sky-pool",
        batch_size=1,
        output=skybatch.JsonWriter(str(out)),
    )
    assert read_jsonl(out) == [{"text": f"r{i}-mounted+dir"} for i in range(4)]

    # Resized from the same file: the same warnings, and --workers wins over num_nodes.
    again = deployment.cli("pool", "apply", str(yaml_path), "--workers", "1", "-y")
    assert [line for line in again.stderr.splitlines() if line.startswith("Warning: ")] == warnings
    assert "Successfully updated pool 'sky-pool'." in again.stdout.splitlines()
    assert skybatch.pool_status("sky-pool")[0].workers == 1


def test_absolute_target_on_a_local_pool_is_refused(deployment: Deployment, tmp_path: Path) -> None:
    yaml_path = tmp_path / "pool.yaml"
    yaml_path.write_text("num_nodes: 1\nfile_mounts:\n  /data: .\n")
    proc = deployment.cli("pool", "apply", str(yaml_path), "-p", "p", "-y", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"Error: {yaml_path} line 2: file_mounts: /data is absolute; a local pool writes only "
        "inside each worker's directory: give a relative target (or ~/...), which lands "
        "there, where the mapper runs"
    ]


def test_file_mounts_reach_ssh_hosts(deployment: Deployment, tmp_path: Path) -> None:
    import json
    import sys

    from tests.e2e.hosts import ssh_hosts

    (tmp_path / "suffix.txt").write_text("mounted\n")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "more.txt").write_text("dir\n")
    remote = tmp_path / "remote"
    with ssh_hosts(tmp_path / "hosts", 1) as hosts:
        provider = {
            "type": "ssh",
            "hosts": [h.alias for h in hosts.hosts],
            "ssh_config": str(hosts.ssh_config),
            "python": sys.executable,
            "remote_dir": str(remote),
        }
        yaml_path = tmp_path / "pool.yaml"
        yaml_path.write_text(
            f"num_nodes: 1\nprovider: {json.dumps(provider)}\nfile_mounts:\n"
            "  data/suffix.txt: suffix.txt\n"
            f"  {tmp_path / 'abs'}: ./extra\n"
        )
        deployment.cli("pool", "apply", str(yaml_path), "-p", "s", "-y", timeout=600)
        host = hosts.hosts[0]
        # A relative target is in the worker's directory, an absolute one the host's path.
        assert hosts.ssh(host, f"cat {tmp_path / 'abs' / 'more.txt'}") == "dir\n"
        found = hosts.ssh(host, f"cat {remote}/*/pools/s/worker-0/data/suffix.txt")
        assert found == "mounted\n"
        assert skybatch.pool_down("s") == []

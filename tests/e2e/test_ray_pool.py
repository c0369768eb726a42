"""The Ray provider on a real two-node Ray cluster that the tests start and stop
(tests/e2e/ray_cluster.py): a head with 2 CPUs, a second node with 1 CPU, 1 GPU and
``accelerator_type:L4``, both on this machine, so the server stays on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import skybatch
from tests.e2e.ray_cluster import RayCluster
from tests.e2e.ray_cluster import cmdline as _cmdline
from tests.e2e.ray_cluster import free_port as _free_port
from tests.e2e.ray_cluster import ray_cluster as start_ray_cluster
from tests.helpers import Deployment, read_jsonl, wait_for, write_jsonl


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    with start_ray_cluster() as cluster:
        yield cluster


def ray_pool_yaml(
    tmp: Path, cluster: RayCluster, workers: int, resources: str = "  cpus: 1\n"
) -> Path:
    path = tmp / "ray-pool.yaml"
    path.write_text(
        f"pool:\n  workers: {workers}\nresources:\n{resources}"
        f"provider:\n  type: ray\n  address: {cluster.address}\n"
    )
    return path


@skybatch.remote_function
def shout():
    import os
    import time

    for batch in skybatch.load():
        time.sleep(float(os.environ.get("SLOW", "0")))
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "-")
        skybatch.save_results([{"text": item["text"].upper(), "gpus": gpus} for item in batch])


def _rows(n: int) -> list[dict[str, str]]:
    return [{"text": f"row {i}"} for i in range(n)]


def test_job_end_to_end_on_a_ray_pool(
    ray_cluster: RayCluster, deployment: Deployment, tmp_path: Path
) -> None:
    applied_at = time.monotonic()
    view = skybatch.pool_apply(str(ray_pool_yaml(tmp_path, ray_cluster, 2)), "rp")
    assert (view.status, view.ready) == ("READY", 2)
    print(f"\nRay pool apply to 2 ready workers: {time.monotonic() - applied_at:.2f}s")
    data = write_jsonl(tmp_path / "in.jsonl", _rows(20))
    out = tmp_path / "out.jsonl"
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        shout, pool_name="rp", batch_size=3, output=skybatch.JsonWriter(str(out))
    )
    # A pool without accelerators sees no GPU, even on the node that has one.
    assert read_jsonl(out) == [{"text": f"ROW {i}", "gpus": ""} for i in range(20)]

    status = deployment.cli("pool", "status", "rp").stdout.splitlines()
    workers = [line.split() for line in status[status.index("") + 2 :] if line.strip()]
    assert [(w[0], w[1], w[3], w[5]) for w in workers] == [
        ("0", "READY", "ray", "-"),
        ("1", "READY", "ray", "-"),
    ]
    assert {w[4] for w in workers} <= {"head", "gpu"}

    # The token crossed to the agents as an actor call's argument and their stdin only:
    # it is in no file of Ray's session (its logs, spilled objects) nor of the node homes.
    token = deployment.home.token_file.read_text().strip()
    sessions = list(ray_cluster.temp.glob("session_*/logs"))
    assert sessions and any(p.is_file() for p in sessions[0].iterdir())
    for root in (ray_cluster.temp, ray_cluster.nodes_home):
        for path in root.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), f"the token is in {path}"
    for p in ray_cluster.processes():
        assert token not in _cmdline(p), f"the token is on the command line of {p.pid}"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert token not in ps.stdout


def test_killed_actor_is_replaced_and_its_batches_rerun(
    ray_cluster: RayCluster, deployment: Deployment, tmp_path: Path
) -> None:
    yaml_path = ray_pool_yaml(tmp_path, ray_cluster, 2)
    yaml_path.write_text(yaml_path.read_text() + "envs:\n  SLOW: '0.2'\n")
    skybatch.pool_apply(str(yaml_path), "rp")
    data = write_jsonl(tmp_path / "in.jsonl", _rows(60))
    out = tmp_path / "out.jsonl"
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        shout, pool_name="rp", batch_size=2, output=skybatch.JsonWriter(str(out)), stream=False
    )
    wait_for(lambda: job.info().committed_batches >= 3, message="batches committing")
    before = {w.index: w.pid for w in skybatch.pool_status("rp")[0].worker_list}
    agent = psutil.Process(before[0])
    actor = agent.parent()
    assert actor is not None and _cmdline(actor).startswith("ray::WorkerActor")
    killed_at = time.monotonic()
    actor.kill()  # SIGKILL: Ray's own restarts are off, so skybatch replaces it

    # The agent dies with its actor, at once.
    wait_for(lambda: not _running(agent.pid), timeout=10, message="the agent gone")
    seen_gone = time.monotonic() - killed_at
    # Its leased batches go back at once, not when their leases expire.
    wait_for(lambda: job.info().lost >= 1, timeout=10, message="its batches re-leased")
    released = time.monotonic() - killed_at

    def replaced() -> bool:
        view = skybatch.pool_status("rp")[0]
        pids = {w.index: w.pid for w in view.worker_list}
        return view.ready == 2 and pids.get(0) not in (None, before[0])

    wait_for(replaced, timeout=60, message="worker 0 replaced")
    back_to_size = time.monotonic() - killed_at
    job.wait()
    assert read_jsonl(out) == [{"text": f"ROW {i}", "gpus": ""} for i in range(60)]
    print(
        f"\nRay actor failover: agent gone {seen_gone:.2f}s after the SIGKILL, its batches "
        f"re-leased after {released:.2f}s, pool back to 2 ready workers after {back_to_size:.2f}s"
    )


def test_accelerator_pool_lands_only_on_the_node_that_has_it(
    ray_cluster: RayCluster, deployment: Deployment, tmp_path: Path
) -> None:
    resources = "  cpus: 1\n  accelerators: L4:1\n"
    view = skybatch.pool_apply(str(ray_pool_yaml(tmp_path, ray_cluster, 1, resources)), "gp")
    assert view.ready == 1
    status = deployment.cli("pool", "status", "gp").stdout.splitlines()
    worker = status[status.index("") + 2].split()
    assert (worker[0], worker[1], worker[4], worker[5]) == ("0", "READY", "gpu", "0")
    data = write_jsonl(tmp_path / "in.jsonl", _rows(4))
    out = tmp_path / "out.jsonl"
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        shout, pool_name="gp", batch_size=2, output=skybatch.JsonWriter(str(out))
    )
    # Ray gave the actor GPU 0, and the mapper sees exactly that one.
    assert read_jsonl(out) == [{"text": f"ROW {i}", "gpus": "0"} for i in range(4)]

    for ask, workers, line in (
        (
            "A100:1",
            1,
            "resources.accelerators: no node of the Ray cluster at {a} has "
            "accelerator_type:A100 for one worker (its nodes offer: gpu: 1 CPU, 1 GPU; "
            "head: 2 CPU); ask for less or add such a node",
        ),
        (
            "L4:2",
            1,
            "resources.accelerators: no node of the Ray cluster at {a} has 2 GPU for one "
            "worker (its nodes offer: gpu: 1 CPU, 1 GPU, accelerator_type:L4; head: 2 CPU); "
            "ask for less or add such a node",
        ),
        (
            # Each worker fits the GPU node, two never fit the cluster: refused at apply,
            # not after launches that wait for a GPU that never comes free.
            "L4:1",
            2,
            "resources.accelerators: the Ray cluster at {a} holds 1 worker of this size (1 "
            "CPU, 1 GPU, accelerator_type:L4), not the pool's 2 (its nodes offer: gpu: 1 CPU, "
            "1 GPU, accelerator_type:L4; head: 2 CPU); ask for fewer workers or less, or add "
            "nodes",
        ),
    ):
        resources = f"  cpus: 1\n  accelerators: {ask}\n"
        path = ray_pool_yaml(tmp_path, ray_cluster, workers, resources)
        result = deployment.cli("pool", "apply", str(path), "--pool", "big", "-y", check=False)
        assert result.returncode == 1
        assert result.stderr.strip() == "Error: " + line.format(a=ray_cluster.address)


def test_pool_yaml_errors_name_the_field(
    ray_cluster: RayCluster, deployment: Deployment, tmp_path: Path
) -> None:
    path = tmp_path / "bad.yaml"
    port = _free_port()  # nothing listens there
    cases = [
        (
            "provider:\n  type: ray\n  adress: auto\n",
            f"Error: {path} line 7: unknown field 'provider.adress'; allowed here: type, address",
        ),
        (
            f"provider:\n  type: ray\n  address: 127.0.0.1:{port}\n",
            f"Error: provider.address: cannot reach the Ray cluster at 127.0.0.1:{port} "
            "(Connection refused); start it (`ray start --head`) or fix the address",
        ),
        (
            "provider:\n  type: ray\n  address: 127.0.0.1:99999\n",
            f"Error: {path} line 7: provider.address: port 99999 of '127.0.0.1:99999' is not "
            "between 1 and 65535",
        ),
    ]
    for provider, line in cases:
        path.write_text(f"pool:\n  workers: 1\nresources:\n  cpus: 1\n{provider}")
        result = deployment.cli("pool", "apply", str(path), "--pool", "bad", "-y", check=False)
        assert (result.returncode, result.stderr.strip()) == (1, line)

    # 3 workers of 1 CPU fit (2 on the head, 1 on the GPU node), 4 never do: refused at
    # once, naming the field, not after a launch that waits for room.
    started = time.monotonic()
    path = ray_pool_yaml(tmp_path, ray_cluster, 4)
    result = deployment.cli("pool", "apply", str(path), "--pool", "big", "-y", check=False)
    took = time.monotonic() - started
    assert (result.returncode, result.stderr.strip()) == (
        1,
        f"Error: resources.cpus: the Ray cluster at {ray_cluster.address} holds 3 workers of "
        "this size (1 CPU), not the pool's 4 (its nodes offer: gpu: 1 CPU; head: 2 CPU); ask "
        "for fewer workers or less, or add nodes",
    )
    assert took < 30, f"refused after {took:.1f}s"
    assert ray_cluster.actors() == []


def test_restarted_server_finds_its_actors_and_pool_down_removes_them(
    ray_cluster: RayCluster, deployment: Deployment, tmp_path: Path
) -> None:
    skybatch.pool_apply(str(ray_pool_yaml(tmp_path, ray_cluster, 2)), "rp")
    before = {w.index: w.pid for w in skybatch.pool_status("rp")[0].worker_list}
    assert len(ray_cluster.actors()) == 2
    # A crashed server leaves its detached actors running; the next one finds them by name.
    pid = deployment.server_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _running(pid), message="the server gone")
    deployment.cli("server", "start")
    view = wait_for(
        lambda: (v := skybatch.pool_status("rp")[0]).ready == 2 and v, message="pool back"
    )
    assert {w.index: w.pid for w in view.worker_list} == before

    node_home = ray_cluster.node_home(deployment.home.deployment_id())
    worker_dirs = list(node_home.glob("pools/rp/worker-*"))
    assert len(worker_dirs) == 2
    deployment.cli("pool", "down", "rp", "-y")
    assert ray_cluster.actors() == []
    assert not any(_running(p) for p in before.values() if p)
    assert not (node_home / "pools" / "rp").exists()


def test_a_node_home_someone_else_owns_fails_the_pool_naming_it(
    ray_cluster: RayCluster, deployment: Deployment, tmp_path: Path
) -> None:
    # Made before the pool by another user of the node (uid 65534): never used, and the
    # error says where it is and what to do.
    node_home = ray_cluster.node_home(deployment.home.deployment_id())
    node_home.mkdir(parents=True, mode=0o700)
    (node_home / "pools").mkdir(mode=0o777)
    os.chown(node_home, 65534, 65534)
    path = ray_pool_yaml(tmp_path, ray_cluster, 1)
    result = deployment.cli("pool", "apply", str(path), "--pool", "rp", "-y", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"Error: pool 'rp': could not start worker 0: {node_home} on Ray node "
        f"{socket.gethostname()} is owned by uid 65534, not the user Ray runs as (uid "
        f"{os.getuid()}), so files in it may be someone else's; remove it (3 tries)"
    )
    wait_for(lambda: ray_cluster.actors() == [], timeout=30, message="no actor left")
    assert [p.name for p in node_home.iterdir()] == ["pools"]
    deployment.cli("pool", "down", "rp", "-y")
    assert (node_home / "pools").is_dir()  # not ours to remove

"""The SSH provider on real hosts: network namespaces with their own sshd
(tests/e2e/hosts.py), SeaweedFS on the bridge address, the server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import psutil
import pytest

import skybatch
from tests.e2e.hosts import Hosts, SshHost, ssh_hosts
from tests.e2e.storage_servers import S3Server, seaweedfs
from tests.helpers import Deployment, wait_for

ROWS = ["hello", "world", "sky", "batch"]
EXPECTED = "".join(json.dumps({"output": t * 2}, separators=(",", ":")) + "\n" for t in ROWS)


@dataclass
class Lab:
    hosts: Hosts
    s3: S3Server
    remote: Path

    def pool_yaml(self, tmp: Path, workers: int = 2, extra: str = "", **provider: Any) -> Path:
        fields = {
            "type": "ssh",
            "hosts": [h.alias for h in self.hosts.hosts],
            "ssh_config": str(self.hosts.ssh_config),
            "python": sys.executable,
            "remote_dir": str(self.remote),
            **provider,
        }
        path = tmp / f"pool-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(
            f"pool: {{workers: {workers}}}\n"
            'setup: echo "Setup complete!"\n'
            f"envs: {json.dumps(self.s3.env())}\n"
            f"provider: {json.dumps(fields)}\n{extra}"
        )
        return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("ssh")
    # SeaweedFS on the bridge: the hosts reach object storage there, not on the
    # server's loopback.
    with (
        ssh_hosts(root / "hosts", 2) as hosts,
        seaweedfs(root / "seaweedfs", ip=hosts.bridge_address) as s3,
        pytest.MonkeyPatch.context() as mp,
    ):
        for key, value in s3.env().items():
            mp.setenv(key, value)
        yield Lab(hosts, s3, root / "remote")


@skybatch.remote_function
def double_text():
    for batch in skybatch.load():
        skybatch.save_results([{"output": item["text"] * 2} for item in batch])


@skybatch.remote_function
def slow_double():
    import time

    for batch in skybatch.load():
        time.sleep(0.5)
        skybatch.save_results([{"output": item["text"] * 2} for item in batch])


def _bucket(rows: list[str]) -> tuple[Any, str]:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists("sb-ssh"):
        fs.mkdir("sb-ssh")
    base = f"s3://sb-ssh/{uuid.uuid4().hex[:10]}"
    fs.pipe_file(
        f"{base}/data.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in rows).encode()
    )
    return fs, base


def _agents(lab: Lab, host: SshHost) -> list[int]:
    pids = []
    for proc in lab.hosts.processes(host):
        with contextlib.suppress(psutil.Error):  # a session exiting meanwhile, a zombie
            if "skybatch.agent" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
    return pids


def _apply(d: Deployment, yaml: Path, name: str = "ssh") -> float:
    start = time.monotonic()
    proc = d.cli("pool", "apply", str(yaml), "--pool", name, "-y", timeout=180)
    assert "is READY" in proc.stdout, proc.stdout
    return time.monotonic() - start


def test_quickstart_on_two_ssh_hosts(lab: Lab, deployment: Deployment, tmp_path: Path) -> None:
    cold = _apply(deployment, lab.pool_yaml(tmp_path))
    # Each host runs one agent, in its namespace: the server's loopback is not there.
    for host in lab.hosts.hosts:
        assert len(_agents(lab, host)) == 1
    fs, base = _bucket(ROWS)
    ds = skybatch.Dataset(skybatch.JsonReader(f"{base}/data.jsonl"))
    ds.map(
        double_text, pool_name="ssh", batch_size=2, output=skybatch.JsonWriter(f"{base}/out.jsonl")
    )
    assert fs.cat_file(f"{base}/out.jsonl").decode() == EXPECTED
    token = deployment.home.token_file.read_text().strip()
    for host in lab.hosts.hosts:
        # Not on a command line there, nor in an agent's environment.
        assert not any(token in line for line in lab.hosts.cmdlines(host))
        for pid in _agents(lab, host):
            assert token.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    logs = [p for p in lab.remote.rglob("*.log")] + list(deployment.home.root.rglob("*.log"))
    assert any(p.name == "agent.log" for p in logs)
    assert all(token not in p.read_text(errors="replace") for p in logs)
    # Down and up again: the hosts have nothing left, then the setup runs anew.
    assert "is down" in deployment.cli("pool", "down", "ssh", "-y").stdout
    _assert_nothing_left(lab)
    again = _apply(deployment, lab.pool_yaml(tmp_path))
    assert "is down" in deployment.cli("pool", "down", "ssh", "-y").stdout
    _assert_nothing_left(lab)
    print(f"\nSSH pool apply to ready on 2 hosts: {cold:.2f}s, again {again:.2f}s")


def _assert_nothing_left(lab: Lab) -> None:
    for host in lab.hosts.hosts:
        # Only sshd itself: its listener, and the sessions of the server's connections.
        left = [c for c in lab.hosts.cmdlines(host) if not c.startswith("sshd:")]
        assert left == [], (host.alias, left)
        assert lab.hosts.ssh(host, f"ls -A {lab.remote} 2>/dev/null; true") == ""
    assert not lab.remote.exists() or list(lab.remote.iterdir()) == []


def _worker_rows(d: Deployment) -> list[tuple[int, int, str, str]]:
    db = sqlite3.connect(str(d.home.db))
    try:
        return db.execute("SELECT id, idx, status, handle FROM workers ORDER BY id").fetchall()
    finally:
        db.close()


def test_a_killed_agent_fails_over(lab: Lab, deployment: Deployment, tmp_path: Path) -> None:
    _apply(deployment, lab.pool_yaml(tmp_path))
    rows = [f"t{i}" for i in range(24)]
    fs, base = _bucket(rows)
    ds = skybatch.Dataset(skybatch.JsonReader(f"{base}/data.jsonl"))
    job = ds.map(
        slow_double, pool_name="ssh", batch_size=1, output=skybatch.JsonWriter(f"{base}/out.jsonl"),
        stream=False,
    )  # fmt: skip
    victim = lab.hosts.hosts[1]
    wait_for(lambda: job.info().committed_batches >= 2, 60, "batches committed")
    (pid,) = _agents(lab, victim)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    # Failover: the server sees the agent gone (its batch goes back at once).
    wait_for(
        lambda: any(r[2] == "LOST" and json.loads(r[3]).get("pid") == pid
                    for r in _worker_rows(deployment)),
        30, "the killed agent seen lost",
    )  # fmt: skip
    failover = time.monotonic() - killed
    # Its replacement starts in the same directory there: setup is cached.
    wait_for(
        lambda: sum(r[2] == "READY" for r in _worker_rows(deployment)) == 2, 60,
        "the replacement ready",
    )  # fmt: skip
    replaced = time.monotonic() - killed
    job.wait(timeout=120)
    expected = "".join(json.dumps({"output": t * 2}, separators=(",", ":")) + "\n" for t in rows)
    assert fs.cat_file(f"{base}/out.jsonl").decode() == expected
    print(
        f"\nSSH agent SIGKILLed: seen lost after {failover:.2f}s, "
        f"replacement ready (setup cached) after {replaced:.2f}s"
    )
    deployment.cli("pool", "down", "ssh", "-y")
    _assert_nothing_left(lab)


def test_an_unreachable_host_is_refused_at_apply(
    lab: Lab, deployment: Deployment, tmp_path: Path
) -> None:
    prefix = lab.hosts.bridge_address.rsplit(".", 1)[0]
    nowhere = f"root@{prefix}.99"
    yaml = lab.pool_yaml(tmp_path, hosts=[lab.hosts.hosts[0].alias, nowhere])
    proc = deployment.cli("pool", "apply", str(yaml), "--pool", "ssh", "-y", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: provider.hosts: cannot reach host {nowhere}: ssh: connect to host "
        f"{prefix}.99 port 22: No route to host"
    ]
    assert "ssh" not in deployment.cli("pool", "status").stdout.split()


def test_a_host_cut_off_longer_than_a_lease(
    lab: Lab, deployment: Deployment, tmp_path: Path
) -> None:
    from skybatch import defaults

    _apply(deployment, lab.pool_yaml(tmp_path))
    rows = [f"r{i}" for i in range(100)]
    fs, base = _bucket(rows)
    ds = skybatch.Dataset(skybatch.JsonReader(f"{base}/data.jsonl"))
    job = ds.map(
        slow_double, pool_name="ssh", batch_size=1, output=skybatch.JsonWriter(f"{base}/out.jsonl"),
        stream=False,
    )  # fmt: skip
    wait_for(lambda: job.info().committed_batches >= 4, 60, "batches committed")
    cut = lab.hosts.hosts[1]
    lab.hosts.cut(cut)
    try:
        # Longer than a lease: the batch it held goes to the other host meanwhile.
        time.sleep(defaults.LEASE_TTL + 5)
        assert job.info().status == "RUNNING"
    finally:
        lab.hosts.restore(cut)
    job.wait(timeout=180)
    # Every row once: the cut-off agent's late commit of its expired lease was refused.
    expected = "".join(json.dumps({"output": t * 2}, separators=(",", ":")) + "\n" for t in rows)
    assert fs.cat_file(f"{base}/out.jsonl").decode() == expected
    info = job.info()
    assert (info.committed_batches, info.status) == (100, "SUCCEEDED")
    deployment.cli("pool", "down", "ssh", "-y")
    _assert_nothing_left(lab)


def test_two_names_of_one_host_are_refused_at_apply(
    lab: Lab, deployment: Deployment, tmp_path: Path
) -> None:
    # The lab's ssh config logs in as root: host-1 and root@host-1 are one sshd.
    yaml = lab.pool_yaml(tmp_path, hosts=["host-1", "root@host-1"])
    proc = deployment.cli("pool", "apply", str(yaml), "--pool", "ssh", "-y", check=False)
    address = lab.hosts.hosts[1].address
    assert (proc.returncode, proc.stderr.strip().splitlines()) == (
        1,
        [
            f"Error: provider.hosts: 'host-1' and 'root@host-1' are one host "
            f"(root@{address}:22); list each host once and raise workers_per_host for more "
            "workers on it"
        ],
    )
    assert "ssh" not in deployment.cli("pool", "status").stdout.split()


def _ready_pid(d: Deployment, pool: str) -> int | None:
    db = sqlite3.connect(str(d.home.db))
    try:
        rows = db.execute(
            "SELECT handle FROM workers WHERE pool=? AND status='READY'", (pool,)
        ).fetchall()
    finally:
        db.close()
    return json.loads(rows[0][0])["pid"] if rows else None


def test_a_frozen_host_holds_up_no_other_worker(
    lab: Lab, deployment: Deployment, tmp_path: Path
) -> None:
    _apply(deployment, lab.pool_yaml(tmp_path))
    local = tmp_path / "local.yaml"
    local.write_text("pool: {workers: 1}\n")
    _apply(deployment, local, "loc")
    frozen = lab.hosts.hosts[1]
    # sshd accepts connections there but nothing answers: every ssh command hangs.
    stopped = []
    try:
        for proc in lab.hosts.processes(frozen):
            with contextlib.suppress(psutil.Error):
                proc.suspend()
                stopped.append(proc)
        time.sleep(1)  # a liveness read of the frozen host is now in flight, hanging
        start = time.monotonic()
        deployment.cli("pool", "status")
        assert time.monotonic() - start < 2
        pid = _ready_pid(deployment, "loc")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        # Before: each monitor tick waited on the frozen host's `ps` (15 s timeout).
        wait_for(lambda: _ready_pid(deployment, "loc") not in (pid, None), 8, "a replacement")
        print(f"\nlocal agent replaced after {time.monotonic() - killed:.2f}s, host-1 frozen")
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.Error):
                proc.resume()
    deployment.cli("pool", "down", "loc", "-y")
    deployment.cli("pool", "down", "ssh", "-y")
    _assert_nothing_left(lab)


# -- GPUs placed per host ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    """Two hosts whose sessions find a fake ``nvidia-smi`` (two L4s) first on their PATH,
    as sshd sets it there (``SetEnv``): the provider's own remote query runs it."""
    from tests.e2e.test_gpus import _FAKE_NVIDIA_SMI, L4

    root = tmp_path_factory.mktemp("ssh-gpus")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(_FAKE_NVIDIA_SMI.format(python=sys.executable, gpus=[L4] * 2))
    fake.chmod(0o755)
    path = f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    with ssh_hosts(root / "hosts", 2, set_env={"PATH": path}) as hosts:
        yield hosts


@skybatch.remote_function
def where_and_gpus():
    import os
    import socket
    import time

    # The host's own address: the one its packets to the bridge leave from.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.connect((os.environ["SB_BRIDGE"], 9))
    address = probe.getsockname()[0]
    probe.close()
    for batch in skybatch.load():
        time.sleep(0.1)  # long enough that every worker takes batches
        skybatch.save_results(
            [
                {"i": r["i"], "host": address, "gpus": os.environ["CUDA_VISIBLE_DEVICES"]}
                for r in batch
            ]
        )


def _gpu_pool(
    hosts: Hosts,
    tmp: Path,
    workers: int,
    per_host: int,
    accelerators: str,
    names: list[str] | None = None,
) -> Path:
    fields = {
        "type": "ssh",
        "hosts": names or [h.alias for h in hosts.hosts],
        "ssh_config": str(hosts.ssh_config),
        "python": sys.executable,
        "remote_dir": str(hosts.root / "remote"),
        "workers_per_host": per_host,
    }
    path = tmp / f"gpus-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(
        f"pool: {{workers: {workers}}}\n"
        f"resources: {{accelerators: '{accelerators}'}}\n"
        f"envs: {{SB_BRIDGE: '{hosts.bridge_address}'}}\n"
        f"provider: {json.dumps(fields)}\n"
    )
    return path


def test_gpus_are_placed_per_host(gpu_hosts: Hosts, deployment: Deployment, tmp_path: Path) -> None:
    free = "0: NVIDIA L4 (22 GiB, free), 1: NVIDIA L4 (22 GiB, free)"
    # Three workers on host-0 (workers 0, 2, 4) ask for three L4s: it has two.
    over = _gpu_pool(gpu_hosts, tmp_path, 6, 3, "L4:1")
    proc = deployment.cli("pool", "apply", str(over), "--pool", "g", "-y", check=False)
    assert (proc.returncode, proc.stderr.strip().splitlines()) == (
        1,
        [
            "Error: pool asks for 3 workers × L4:1 but host host-0 has 2 L4 GPUs free: "
            f"{free}; lower pool.workers or the count in resources.accelerators"
        ],
    )
    other = _gpu_pool(gpu_hosts, tmp_path, 2, 1, "A100:1")
    proc = deployment.cli("pool", "apply", str(other), "--pool", "g", "-y", check=False)
    assert proc.stderr.strip().splitlines() == [
        f"Error: pool asks for A100 GPUs but host host-0 has none: {free}; "
        "set resources.accelerators to a type it has"
    ]

    _apply(deployment, _gpu_pool(gpu_hosts, tmp_path, 4, 2, "L4:1"), "g")
    view = skybatch.pool_status("g")[0]
    assert sorted((w.host, w.gpus) for w in view.worker_list) == [
        ("host-0", [0]), ("host-0", [1]), ("host-1", [0]), ("host-1", [1]),
    ]  # fmt: skip
    # While the pool holds every L4 of both hosts, a second pool gets none of them.
    proc = deployment.cli(
        "pool", "apply", str(_gpu_pool(gpu_hosts, tmp_path, 1, 1, "L4:1")), "--pool", "h", "-y",
        check=False,
    )  # fmt: skip
    assert proc.stderr.strip().splitlines() == [
        "Error: pool asks for 1 worker × L4:1 but host host-0 has 0 L4 GPUs free: "
        "0: NVIDIA L4 (22 GiB, pool g), 1: NVIDIA L4 (22 GiB, pool g); "
        "lower pool.workers or the count in resources.accelerators"
    ]
    job = skybatch.Dataset.from_items([{"i": i} for i in range(40)]).map(
        where_and_gpus, pool_name="g", batch_size=1
    )
    rows = job.results()
    assert [r["i"] for r in rows] == list(range(40))
    # Each host's two workers split its two GPUs: disjoint and complete, per host.
    addresses = [h.address for h in gpu_hosts.hosts]
    assert {(r["host"], r["gpus"]) for r in rows} == {(a, g) for a in addresses for g in "01"}
    deployment.cli("pool", "down", "g", "-y")


def test_one_host_named_two_ways_never_shares_a_gpu(
    gpu_hosts: Hosts, deployment: Deployment, tmp_path: Path
) -> None:
    _apply(deployment, _gpu_pool(gpu_hosts, tmp_path, 1, 1, "L4:1", ["host-0"]), "a")
    # Before: claims were keyed by the host's name, so root@host-0 got GPU 0 again.
    _apply(deployment, _gpu_pool(gpu_hosts, tmp_path, 1, 1, "L4:1", ["root@host-0"]), "b")
    assert [w.gpus for w in skybatch.pool_status("a")[0].worker_list] == [[0]]
    assert [w.gpus for w in skybatch.pool_status("b")[0].worker_list] == [[1]]
    third = _gpu_pool(gpu_hosts, tmp_path, 1, 1, "L4:1", ["host-0:22"])
    proc = deployment.cli("pool", "apply", str(third), "--pool", "c", "-y", check=False)
    assert (proc.returncode, proc.stderr.strip().splitlines()) == (
        1,
        [
            "Error: pool asks for 1 worker × L4:1 but host host-0:22 has 0 L4 GPUs free: "
            "0: NVIDIA L4 (22 GiB, pool a), 1: NVIDIA L4 (22 GiB, pool b); "
            "lower pool.workers or the count in resources.accelerators"
        ],
    )
    deployment.cli("pool", "down", "a", "-y")
    deployment.cli("pool", "down", "b", "-y")


# -- local files through the relay, server restarts, hosts down at launch ----------------

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart"


def _provider(lab: Lab, **fields: Any) -> str:
    section = {
        "type": "ssh",
        "hosts": [h.alias for h in lab.hosts.hosts],
        "ssh_config": str(lab.hosts.ssh_config),
        "python": sys.executable,
        "remote_dir": str(lab.remote),
        **fields,
    }
    return f"provider: {json.dumps(section)}\n"


def test_the_quickstart_script_and_from_items_through_the_relay(
    lab: Lab, deployment: Deployment, tmp_path: Path
) -> None:
    # The example's own files, as a user copies them; only pool.yaml names the hosts.
    for name in ("data.jsonl", "my_script.py"):
        (tmp_path / name).write_bytes((EXAMPLE / name).read_bytes())
    (tmp_path / "pool.yaml").write_text((EXAMPLE / "pool.yaml").read_text() + _provider(lab))
    proc = deployment.cli("pool", "apply", "pool.yaml", "--pool", "my-pool", "-y", cwd=tmp_path)
    assert "Pool 'my-pool' is READY: 2/2 workers ready." in proc.stdout
    run = subprocess.run(
        [sys.executable, "my_script.py"], cwd=tmp_path, env=deployment.env(),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out.jsonl").read_text() == EXPECTED
    # Rows from memory, results back to memory: the server's home, relayed both ways.
    job = skybatch.Dataset.from_items([{"text": t} for t in ROWS]).map(
        double_text, pool_name="my-pool", batch_size=3
    )
    assert job.results() == [{"output": t * 2} for t in ROWS]
    deployment.cli("pool", "down", "my-pool", "-y")
    _assert_nothing_left(lab)


def _local_job(tmp_path: Path, rows: list[str], pool: str = "ssh") -> tuple[skybatch.Job, Path]:
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    out = tmp_path / "out.jsonl"
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        slow_double, pool_name=pool, batch_size=1, output=skybatch.JsonWriter(str(out)),
        stream=False,
    )  # fmt: skip
    return job, out


def _doubled(rows: list[str]) -> str:
    return "".join(json.dumps({"output": t * 2}, separators=(",", ":")) + "\n" for t in rows)


def test_a_server_killed_mid_job_finds_its_agents_again(
    lab: Lab, deployment: Deployment, tmp_path: Path
) -> None:
    _apply(deployment, lab.pool_yaml(tmp_path))
    rows = [f"k{i}" for i in range(30)]
    job, out = _local_job(tmp_path, rows)
    wait_for(lambda: job.info().committed_batches >= 4, 60, "batches committed")
    agents = {h.alias: _agents(lab, h) for h in lab.hosts.hosts}
    pid = deployment.server_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(pid), 10, "the server gone")
    deployment.cli("server", "start")
    job.wait(timeout=180)
    assert out.read_text() == _doubled(rows)
    # The agents carried on through the tunnels the new server opened on their ports.
    assert {h.alias: _agents(lab, h) for h in lab.hosts.hosts} == agents
    workers = [r for r in _worker_rows(deployment) if r[2] == "READY"]
    assert len(workers) == 2 and len(_worker_rows(deployment)) == 2
    deployment.cli("pool", "down", "ssh", "-y")
    _assert_nothing_left(lab)


def _tunnel_ssh(socket: str) -> list[int]:
    """The pids of the ssh clients (on the server's side) forwarding ``socket``."""
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "-R" in cmdline and any(a.startswith(f"{socket}:") for a in cmdline):
            pids.append(proc.pid)
    return pids


def test_tunnels_end_in_private_sockets_and_come_back_when_dropped(
    lab: Lab, deployment: Deployment, tmp_path: Path
) -> None:
    _apply(deployment, lab.pool_yaml(tmp_path))
    handles = {h["host"]: h for h in (json.loads(r[3]) for r in _worker_rows(deployment))}
    sockets = {}
    for host in lab.hosts.hosts:
        # No port a co-tenant could take over once a tunnel drops: the host listens on
        # its sshd's port alone.
        listening = subprocess.run(
            ["ip", "netns", "exec", host.netns, "ss", "-Hltn"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert [line.split()[3] for line in listening.splitlines()] == [f"{host.address}:22"]
        # The agents' end is a socket of the user's, in a directory only the user enters.
        path = Path(handles[host.alias]["socket"])
        sockets[host.alias] = path
        found, folder = path.lstat(), path.parent.lstat()
        assert stat.S_ISSOCK(found.st_mode) and stat.S_IMODE(found.st_mode) == 0o600
        assert stat.S_ISDIR(folder.st_mode) and stat.S_IMODE(folder.st_mode) == 0o700
        assert found.st_uid == folder.st_uid == os.getuid()  # the hosts' user: root
        assert len(str(path)) < 104
        for pid in _agents(lab, host):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"SKYBATCH_SERVER_SOCKET={path}".encode() in environ
    rows = [f"t{i}" for i in range(30)]
    job, out = _local_job(tmp_path, rows)
    wait_for(lambda: job.info().committed_batches >= 4, 60, "batches committed")
    agents = {h.alias: _agents(lab, h) for h in lab.hosts.hosts}
    # A tunnel drops: its ssh killed by pid. It comes back on the same socket (the
    # stale one removed first) and the same agents carry on through it.
    victim = str(sockets["host-0"])
    (dropped,) = _tunnel_ssh(victim)
    os.kill(dropped, signal.SIGKILL)
    wait_for(lambda: _tunnel_ssh(victim) not in ([], [dropped]), 30, "the tunnel opened again")
    assert job.info().committed_batches < len(rows)
    job.wait(timeout=180)
    assert out.read_text() == _doubled(rows)
    assert {h.alias: _agents(lab, h) for h in lab.hosts.hosts} == agents
    deployment.cli("pool", "down", "ssh", "-y")
    _assert_nothing_left(lab)
    assert not any(p.parent.exists() for p in sockets.values())
    # A directory at the socket's place that others may enter is refused, not used.
    # (One worker, on host-0; the same provider section, so the same place.)
    sockets["host-0"].parent.mkdir()
    sockets["host-0"].parent.chmod(0o755)
    try:
        yaml = lab.pool_yaml(tmp_path, workers=1)
        proc = deployment.cli("pool", "apply", str(yaml), "--pool", "ssh", "-y", check=False)
    finally:
        sockets["host-0"].parent.rmdir()
    assert proc.returncode == 1
    assert (
        f"host host-0: the tunnel's socket directory {sockets['host-0'].parent} is not this "
        f"user's alone (mode drwxr-xr-x, owner uid {os.getuid()}); remove it, or set TMPDIR "
        "there to a directory of this user's"
    ) in proc.stderr
    deployment.cli("pool", "down", "ssh", "-y")
    _assert_nothing_left(lab)


def test_pool_down_says_what_it_could_not_stop_on_a_host_cut_off(
    lab: Lab, deployment: Deployment, tmp_path: Path
) -> None:
    _apply(deployment, lab.pool_yaml(tmp_path))
    cut = lab.hosts.hosts[1]
    (left,) = _agents(lab, cut)
    lab.hosts.cut(cut)
    try:
        proc = deployment.cli("pool", "down", "ssh", "-y", timeout=240)
    finally:
        lab.hosts.restore(cut)
    try:
        assert proc.stdout == "Pool 'ssh' is down.\n"
        agent, files = proc.stderr.strip().splitlines()
        assert agent.startswith(
            f"Warning: host host-1: the agent of worker 1 (pid {left}) was not stopped ("
        ), agent
        assert agent.endswith(
            "); it stops by itself within 10 minutes of losing the server, or stop it there"
        ), agent
        remote = f"{lab.remote}/{deployment.home.read_deployment_id()}/pools/ssh"
        assert files.startswith(f"Warning: host host-1: {remote} was not removed ("), files
        assert files.endswith("); remove it there"), files
        # The host that was reached has nothing left.
        assert _agents(lab, lab.hosts.hosts[0]) == []
    finally:
        with contextlib.suppress(psutil.Error):
            psutil.Process(left).kill()
    wait_for(lambda: _agents(lab, cut) == [], 20, "the left agent killed by the test")
    _assert_nothing_left(lab)


def test_a_host_down_at_launch_degrades_the_pool_until_it_is_back(
    lab: Lab, deployment: Deployment, tmp_path: Path
) -> None:
    _apply(deployment, lab.pool_yaml(tmp_path))
    deployment.cli("server", "stop")
    down = lab.hosts.hosts[1]
    lab.hosts.stop_host(down)  # gone while the server was stopped
    try:
        deployment.cli("server", "start")
        refused = (
            "could not start worker 1: cannot reach host host-1: ssh: connect to host "
            f"{down.address} port 22: Connection refused; trying again in "
        )

        def degraded() -> bool:
            view = skybatch.pool_status("ssh")[0]
            return view.status == "DEGRADED" and view.ready == 1 and refused in (view.error or "")

        wait_for(degraded, 60, "the pool degraded, worker 0 ready")
        # The working host runs the job meanwhile.
        rows = [f"d{i}" for i in range(6)]
        job, out = _local_job(tmp_path, rows)
        job.wait(timeout=120)
        assert out.read_text() == _doubled(rows)
    finally:
        lab.hosts.start_sshd(down)
    wait_for(lambda: skybatch.pool_status("ssh")[0].status == "READY", 90, "the pool ready")
    view = skybatch.pool_status("ssh")[0]
    assert (view.ready, view.error) == (2, None)
    assert sorted(w.host for w in view.worker_list) == ["host-0", "host-1"]
    deployment.cli("pool", "down", "ssh", "-y")
    _assert_nothing_left(lab)


def test_a_failed_setup_names_the_host_and_its_log(
    lab: Lab, deployment: Deployment, tmp_path: Path
) -> None:
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("pool: {workers: 1}\nsetup: 'echo no-such-thing; exit 3'\n" + _provider(lab))
    proc = deployment.cli("pool", "apply", str(yaml), "--pool", "bad", "-y", check=False)
    log = lab.remote / deployment.home.deployment_id() / "pools/bad/worker-0/.skybatch/agent.log"
    assert proc.stderr.strip().splitlines() == [
        "Error: pool 'bad': setup failed on worker 0 with exit code 3 (last output: "
        "'no-such-thing'); fix `setup` in the pool YAML and apply it again; full output in "
        f"{log} on host host-0"
    ]
    assert "no-such-thing" in log.read_text()
    deployment.cli("pool", "down", "bad", "-y")
    _assert_nothing_left(lab)

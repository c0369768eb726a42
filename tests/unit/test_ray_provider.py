"""The Ray provider's pure parts: its YAML section, what a worker asks of a node, and why
a cluster cannot hold one; the node home it makes (in a temporary HOME); the Guard's names
for a server on a non-loopback address."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from skybatch.config import Home
from skybatch.errors import PoolError, PoolSpecError
from skybatch.pools.providers.base import ServerAccess
from skybatch.pools.providers.ray import (
    RayConfig,
    RayProvider,
    _demand,
    _fit_error,
    _pack,
    _prepare_node_home,
)
from skybatch.pools.spec import parse_pool_spec
from skybatch.server.guard import Guard
from skybatch.server.tls import is_loopback


def _spec(resources: str, provider: str = "{type: ray}") -> Any:
    return parse_pool_spec(f"pool: {{workers: 1}}\nresources: {resources}\nprovider: {provider}\n")


@pytest.mark.parametrize(
    "address", ["auto", "10.0.0.5:6379", "head.example:6379", "ray://head:10001"]
)
def test_addresses_accepted(address: str) -> None:
    spec = _spec("{cpus: 1}", f"{{type: ray, address: '{address}'}}")
    assert spec.provider_config.model_dump() == {"type": "ray", "address": address}


@pytest.mark.parametrize(
    "address", ["", "head", "http://head:8265", "ray://head", "a b:1", "h:123456"]
)
def test_bad_address_names_the_field(address: str) -> None:
    with pytest.raises(PoolSpecError) as e:
        _spec("{cpus: 1}", f"{{type: ray, address: '{address}'}}")
    assert str(e.value) == (
        "pool YAML line 3: provider.address: expected auto, HOST:PORT (the head's GCS, port "
        "6379 by default) or ray://HOST:PORT (Ray Client, port 10001), "
        f"got {address!r}"
    )


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "ray://head:0", "head:65536"])
def test_port_out_of_range_names_the_field(address: str) -> None:
    with pytest.raises(PoolSpecError) as e:
        _spec("{cpus: 1}", f"{{type: ray, address: '{address}'}}")
    port = int(address.rsplit(":", 1)[1])
    assert str(e.value) == (
        f"pool YAML line 3: provider.address: port {port} of {address!r} is not between 1 and 65535"
    )


def test_demand_maps_resources_to_ray() -> None:
    assert _demand(_spec("{}")) == {"CPU": 1.0}
    assert _demand(_spec("{cpus: 2+, memory: 16, accelerators: L4:2}")) == {
        "CPU": 2.0,
        "memory": 16e9,
        "GPU": 2.0,
        "accelerator_type:L4": 0.001,
    }


_NODES = [
    {"Alive": True, "NodeName": "head", "Resources": {"CPU": 8.0, "memory": 32e9}},
    {
        "Alive": True,
        "NodeName": "gpu-1",
        "Resources": {"CPU": 4.0, "GPU": 1.0, "accelerator_type:L4": 1.0, "memory": 16e9},
    },
    {"Alive": False, "NodeName": "gone", "Resources": {"CPU": 64.0, "GPU": 8.0}},
]


@pytest.mark.parametrize(
    ("resources", "error"),
    [
        ("{cpus: 8}", None),
        ("{cpus: 4, accelerators: L4:1}", None),
        (
            "{cpus: 16}",
            "resources.cpus: no node of the Ray cluster at A has 16 CPU for one worker (its "
            "nodes offer: gpu-1: 4 CPU; head: 8 CPU); ask for less or add such a node",
        ),
        (
            "{cpus: 1, accelerators: A100:1}",
            "resources.accelerators: no node of the Ray cluster at A has "
            "accelerator_type:A100 for one worker (its nodes offer: gpu-1: 4 CPU, 1 GPU; "
            "head: 8 CPU); ask for less or add such a node",
        ),
        (
            "{cpus: 8, accelerators: L4:1}",
            "resources: no node of the Ray cluster at A has 8 CPU, 1 GPU, accelerator_type:L4 "
            "together for one worker (its nodes offer: gpu-1: 4 CPU, 1 GPU, "
            "accelerator_type:L4; head: 8 CPU); ask for less or add such a node",
        ),
        (
            "{cpus: 1, memory: 64}",
            "resources.memory: no node of the Ray cluster at A has 64 GB memory for one worker "
            "(its nodes offer: gpu-1: 4 CPU, 16 GB memory; head: 8 CPU, 32 GB memory); ask "
            "for less or add such a node",
        ),
    ],
)
def test_fit_error_says_which_resource(resources: str, error: str | None) -> None:
    assert _fit_error("A", _demand(_spec(resources)), _NODES) == error


@pytest.mark.parametrize(
    ("resources", "workers", "error"),
    [
        # head holds 8 and gpu-1 4 workers of 1 CPU; the dead node counts for nothing.
        ("{cpus: 1}", 12, None),
        (
            "{cpus: 1}",
            13,
            "resources.cpus: the Ray cluster at A holds 12 workers of this size (1 CPU), not "
            "the pool's 13 (its nodes offer: gpu-1: 4 CPU; head: 8 CPU); ask for fewer "
            "workers or less, or add nodes",
        ),
        # 3 CPUs each: two on head, one on gpu-1 (the CPUs left over on each are no worker).
        ("{cpus: 3}", 3, None),
        (
            "{cpus: 3}",
            4,
            "resources.cpus: the Ray cluster at A holds 3 workers of this size (3 CPU), not "
            "the pool's 4 (its nodes offer: gpu-1: 4 CPU; head: 8 CPU); ask for fewer workers "
            "or less, or add nodes",
        ),
        # Memory binds before CPUs: 32 GB on head and 16 on gpu-1 hold 3 workers of 16 GB.
        (
            "{cpus: 1, memory: 16}",
            4,
            "resources.memory: the Ray cluster at A holds 3 workers of this size (1 CPU, 16 GB "
            "memory), not the pool's 4 (its nodes offer: gpu-1: 4 CPU, 16 GB memory; head: 8 "
            "CPU, 32 GB memory); ask for fewer workers or less, or add nodes",
        ),
        # One GPU in the cluster: a second GPU worker never fits, whatever the CPUs say.
        ("{cpus: 1, accelerators: L4:1}", 1, None),
        (
            "{cpus: 1, accelerators: L4:1}",
            2,
            "resources.accelerators: the Ray cluster at A holds 1 worker of this size (1 CPU, "
            "1 GPU, accelerator_type:L4), not the pool's 2 (its nodes offer: gpu-1: 4 CPU, 1 "
            "GPU, accelerator_type:L4; head: 8 CPU); ask for fewer workers or less, or add nodes",
        ),
        # A tie between GPUs and CPUs (gpu-1 has 4 CPUs) names the GPUs.
        (
            "{cpus: 4, accelerators: L4:1}",
            2,
            "resources.accelerators: the Ray cluster at A holds 1 worker of this size (4 CPU, "
            "1 GPU, accelerator_type:L4), not the pool's 2 (its nodes offer: gpu-1: 4 CPU, 1 "
            "GPU, accelerator_type:L4; head: 8 CPU); ask for fewer workers or less, or add nodes",
        ),
        # A worker no node holds at all is still the one-worker refusal.
        (
            "{cpus: 16}",
            2,
            "resources.cpus: no node of the Ray cluster at A has 16 CPU for one worker (its "
            "nodes offer: gpu-1: 4 CPU; head: 8 CPU); ask for less or add such a node",
        ),
    ],
)
def test_fit_error_packs_the_whole_pool(resources: str, workers: int, error: str | None) -> None:
    assert _fit_error("A", _demand(_spec(resources)), _NODES, workers) == error


def test_fractions_pack_without_float_error() -> None:
    # 0.7 / 0.1 is 6.999999999999999 in floats; Ray, counting in 1e-4, places 7.
    nodes = [{"Alive": True, "NodeName": "n", "Resources": {"CPU": 0.7}}]
    assert _fit_error("A", {"CPU": 0.1}, nodes, 7) is None
    assert _fit_error("A", {"CPU": 0.1}, nodes, 8) is not None


def test_no_live_node() -> None:
    assert _fit_error("A", {"CPU": 1.0}, _NODES[2:]) == (
        "provider.address: the Ray cluster at A has no live node"
    )


def test_workdir_travels_packed(tmp_path: Any) -> None:
    (tmp_path / "helper.py").write_text("X = 1\n")
    data = _pack(str(tmp_path))
    assert data is not None and data[:2] == b"\x1f\x8b"
    assert _pack(None) is None


#: Every directory the node home has once worker 0 of pool p started, below HOME.
_LEVELS = [
    ".skybatch-ray",
    ".skybatch-ray/d",
    ".skybatch-ray/d/pools",
    ".skybatch-ray/d/pools/p",
    ".skybatch-ray/d/pools/p/worker-0",
    ".skybatch-ray/d/logs",
    ".skybatch-ray/d/logs/pools",
    ".skybatch-ray/d/logs/pools/p",
]
_NODE = f"on Ray node {socket.gethostname()}"


@pytest.fixture
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    return home


def test_node_home_levels_are_made_ours_alone(user_home: Path) -> None:
    old = os.umask(0)  # mkdir's mode, not the umask, must make them private
    try:
        assert _prepare_node_home("d", "p", 0).root == user_home / ".skybatch-ray" / "d"
    finally:
        os.umask(old)
    for level in _LEVELS:
        st = (user_home / level).stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.getuid(), 0o700), level
    # Our own level left open to reading is tightened; a second start finds it all.
    os.chmod(user_home / _LEVELS[4], 0o755)
    _prepare_node_home("d", "p", 0)
    assert stat.S_IMODE((user_home / _LEVELS[4]).stat().st_mode) == 0o700


@pytest.mark.parametrize("level", _LEVELS)
@pytest.mark.parametrize("how", ["foreign", "group-writable", "world-writable", "symlink"])
def test_a_level_someone_else_could_fill_is_refused(user_home: Path, level: str, how: str) -> None:
    if how == "foreign" and os.getuid() != 0:
        pytest.skip("giving a directory to another uid takes root")
    path = user_home / level
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if how == "symlink":
        (user_home / "elsewhere").mkdir(mode=0o700)
        path.symlink_to(user_home / "elsewhere")
    else:
        path.mkdir(mode=0o700)
    if how == "foreign":
        os.chown(path, 65534, 65534)
    elif how.endswith("writable"):
        os.chmod(path, 0o770 if how.startswith("group") else 0o777)
    with pytest.raises(PoolError) as e:
        _prepare_node_home("d", "p", 0)
    reason = {
        "foreign": f"is owned by uid 65534, not the user Ray runs as (uid {os.getuid()}), so "
        "files in it may be someone else's",
        "group-writable": "is writable by others (mode 0770), so files in it may be someone else's",
        "world-writable": "is writable by others (mode 0777), so files in it may be someone else's",
        "symlink": "is not a directory (a symbolic link?)",
    }[how]
    assert str(e.value) == f"{path} {_NODE} {reason}; remove it"
    assert list((user_home / "elsewhere" if how == "symlink" else path).iterdir()) == []


def test_a_home_anyone_can_swap_is_refused(user_home: Path) -> None:
    os.chmod(user_home, 0o777)
    with pytest.raises(PoolError) as e:
        _prepare_node_home("d", "p", 0)
    assert str(e.value) == (
        f"{user_home}/.skybatch-ray/d {_NODE} lies inside {user_home}, which anyone can write "
        "(mode 0777, not sticky); give the user Ray runs as a home directory of its own"
    )
    assert not (user_home / ".skybatch-ray").exists()


def test_a_relative_home_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "relative/home")
    with pytest.raises(PoolError) as e:
        _prepare_node_home("d", "p", 0)
    assert str(e.value) == (
        f"the user Ray runs as {_NODE} has no home directory (HOME='relative/home'); set "
        "HOME for the Ray nodes"
    )


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        *(("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True)),
        *(("10.1.2.3", False), ("gpu-box", False), ("fd00::2", False)),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _status(guard: Guard, host: bytes) -> int:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/health",
        "headers": [(b"host", host)],
    }
    asyncio.run(guard(scope, receive, send))
    return int(sent[0]["status"])


def test_guard_accepts_the_served_address() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = Guard(app, token="t", port=8443, host="10.1.2.3")
    assert _status(guard, b"10.1.2.3:8443") == 200
    assert _status(guard, b"127.0.0.1:8443") == 200
    assert _status(guard, b"10.1.2.4:8443") == 421
    assert _status(guard, b"10.1.2.3:8444") == 421
    assert _status(Guard(app, token="t", port=8443, host="fd00::2"), b"[fd00::2]:8443") == 200


def test_loopback_server_refuses_nodes_on_other_machines(tmp_path: Any) -> None:
    provider = RayProvider(RayConfig(address="head:6379"))
    provider.attach(ServerAccess("http://127.0.0.1:8000", "t", Home(tmp_path)))
    here = {"Alive": True, "NodeName": "head", "NodeManagerAddress": "127.0.0.1"}
    away = {"Alive": True, "NodeName": "gpu-1", "NodeManagerAddress": "203.0.113.9"}
    assert provider._unreachable([here]) is None
    assert provider._unreachable([here, away]) == (
        "provider: nodes of the Ray cluster at head:6379 run on other machines (gpu-1 "
        "(203.0.113.9)), whose agents cannot reach this server at http://127.0.0.1:8000; "
        "restart it on an address they reach: `skybatch server stop`, then `skybatch server "
        "start --host ADDR` (served over HTTPS)"
    )
    provider.attach(ServerAccess("https://10.1.2.3:8000", "t", Home(tmp_path), cert="PEM"))
    assert provider._unreachable([here, away]) is None

"""The SSH provider's pure parts: its YAML section, host strings, the shipped wheel."""

from __future__ import annotations

import io
import zipfile

import pytest

from skybatch.errors import PoolSpecError
from skybatch.pools.providers.ssh.config import Host, parse_host
from skybatch.pools.providers.ssh.shipping import build_wheel, install_script, remote_path
from skybatch.pools.spec import parse_pool_spec


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("gpu-a", Host("gpu-a", "gpu-a")),
        ("root@10.0.0.6:2222", Host("root@10.0.0.6:2222", "10.0.0.6", "root", 2222)),
        ("me@[fe80::1]:22", Host("me@[fe80::1]:22", "fe80::1", "me", 22)),
    ],
)
def test_hosts_parse(text: str, host: Host) -> None:
    assert parse_host(text) == host
    # Whatever the name, ssh reads it as the destination, never as an option.
    assert host.destination()[-2:] == ["--", host.name]


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ("{type: ssh}", "missing required field 'provider.hosts'"),
        ("{type: ssh, hosts: [a], port: 2}", "unknown field 'provider.port'"),
        ("{type: ssh, hosts: [a, a]}", "provider.hosts: 'a' is listed twice"),
        ("{type: ssh, hosts: ['-oProxyCommand=x']}", "'-oProxyCommand=x' is not a host"),
        (
            "{type: ssh, hosts: [a, 'x@-oProxyCommand=sh']}",
            "provider.hosts: 'x@-oProxyCommand=sh' is not a host: a user or host name may not "
            "start with '-'",
        ),
        ("{type: ssh, hosts: [a], ssh_config: conf}", "provider.ssh_config: 'conf' is relative"),
        ("{type: ssh, hosts: [a], workers_per_host: 0}", "provider.workers_per_host"),
    ],
)
def test_bad_sections_are_one_line(section: str, error: str) -> None:
    with pytest.raises(PoolSpecError) as e:
        parse_pool_spec(f"pool: {{workers: 1}}\nprovider: {section}\n")
    assert error in str(e.value) and "\n" not in str(e.value)


def test_the_wheel_carries_the_package_and_its_dependencies() -> None:
    wheel = build_wheel()
    assert wheel.name == f"skybatch-{wheel.version}-py3-none-any.whl"
    names = zipfile.ZipFile(io.BytesIO(wheel.data)).namelist()
    info = f"skybatch-{wheel.version}.dist-info"
    assert {f"{info}/METADATA", f"{info}/RECORD", f"{info}/WHEEL"} <= set(names)
    assert "skybatch/agent/agent.py" in names and "skybatch/runner/main.py" in names
    assert not [n for n in names if "__pycache__" in n]
    metadata = zipfile.ZipFile(io.BytesIO(wheel.data)).read(f"{info}/METADATA").decode()
    assert "Requires-Dist: httpx" in metadata
    assert build_wheel() == wheel  # the same files make the same wheel (and venv name)


def test_remote_paths_keep_the_remote_home() -> None:
    assert remote_path("~/.skybatch-workers") == '"$HOME"/.skybatch-workers'
    assert remote_path("/srv/a b") == "'/srv/a b'"
    script = install_script("~/w", build_wheel(), check_only=False)
    assert "flock 9" in script and '"$HOME"/w/venv-' in script

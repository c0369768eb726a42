"""Test hosts for the SSH provider: network namespaces, each running its own sshd.

``ssh_hosts(root, count)`` makes a bridge on a private /24 (picked among those this
machine does not use), one namespace per host joined to it by a veth pair, a client
key and a host key per host made by the test, an sshd per namespace listening on
that namespace's address only, and an ssh_config with one alias per host (``host-0``,
``host-1``, ...) that trusts exactly those host keys. Nothing touches ~/.ssh. A host
reaches the machine only through the bridge, so its 127.0.0.1 is its own: the
server's loopback is out of its reach. Everything is removed afterwards, whatever
happens: every process in the namespaces is killed by PID, then the namespaces, the
veth pairs and the bridge are deleted. Needs root and ``openssh-server``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

__all__ = ["Hosts", "SshHost", "ssh_hosts"]

SSHD = "/usr/sbin/sshd"


@dataclass
class SshHost:
    alias: str
    netns: str
    address: str
    #: The veth end on the machine's side: down cuts the host off, up restores it.
    link: str
    sshd: subprocess.Popen[bytes] | None = None


@dataclass
class Hosts:
    hosts: list[SshHost]
    ssh_config: Path
    #: The machine's address on the bridge: what the hosts reach it by.
    bridge_address: str
    root: Path
    _cut: set[str] = field(default_factory=set)

    def cut(self, host: SshHost) -> None:
        _ip("link", "set", host.link, "down")
        self._cut.add(host.link)

    def restore(self, host: SshHost) -> None:
        _ip("link", "set", host.link, "up")
        self._cut.discard(host.link)

    def start_sshd(self, host: SshHost, wait: bool = True) -> None:
        """Start the host's sshd (again): it listens on the host's address."""
        log = self.root / f"{host.alias}_sshd.log"
        config = self.root / f"{host.alias}_sshd_config"
        with open(log, "ab") as out:
            host.sshd = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, SSHD, "-D", "-e", "-f", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        if wait:
            _wait_port(host.address, 22, host.sshd, log)

    def stop_host(self, host: SshHost) -> None:
        """The host as if it rebooted without sshd: every process in it killed (sshd, its
        sessions, agents), the network up, port 22 refused."""
        _kill_namespace(self, host)
        if host.sshd is not None:
            host.sshd.wait(timeout=10)
            host.sshd = None

    def pids(self, host: SshHost) -> list[int]:
        """Every process in the host's namespace (its sshd, sessions, agents, runners)."""
        out = subprocess.run(
            ["ip", "netns", "pids", host.netns], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]

    def processes(self, host: SshHost) -> list[psutil.Process]:
        procs = []
        for pid in self.pids(host):
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
        return procs

    def cmdlines(self, host: SshHost) -> list[str]:
        lines = []
        for proc in self.processes(host):
            with contextlib.suppress(psutil.Error):
                lines.append(" ".join(proc.cmdline()))
        return lines

    def ssh(self, host: SshHost, command: str) -> str:
        """Run ``command`` on ``host`` as a user would, through the test's ssh_config."""
        return subprocess.run(
            ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", host.alias, command],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        ).stdout


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=30)


def _free_subnet() -> str:
    """``10.A.B`` of a /24 that no address or route of this machine touches."""
    used = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    used += subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    rng = random.Random()
    for _ in range(200):
        prefix = f"10.{rng.randrange(100, 250)}.{rng.randrange(1, 250)}"
        if f"{prefix}." not in used:
            return prefix
    raise RuntimeError("no free private /24 found")


def _wait_port(address: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd on {address} exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd on {address} does not answer: {log.read_text()[-2000:]}")
        time.sleep(0.05)


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    return path.with_suffix(".pub").read_text().strip()


def _kill_namespace(hosts: Hosts, host: SshHost) -> None:
    """Every process in the namespace, by PID, until none is left (bounded)."""
    for _ in range(50):
        pids = hosts.pids(host)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _kill_clients(ssh_config: Path) -> None:
    """ssh clients (masters, tunnels) still running with this test's ssh_config, by PID:
    a server the test killed cannot close its own."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(ssh_config) in (proc.info["cmdline"] or []):
                proc.kill()


@contextlib.contextmanager
def ssh_hosts(root: Path, count: int = 2, set_env: dict[str, str] | None = None) -> Iterator[Hosts]:
    """``count`` hosts on a fresh bridge, each with its sshd; see the module's docstring.

    ``set_env``: environment sshd gives every session (sshd_config ``SetEnv``).
    """
    if os.geteuid() != 0 or not os.path.exists(SSHD):
        raise RuntimeError("SSH test hosts need root and openssh-server (/usr/sbin/sshd)")
    root.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    tag = f"{random.randrange(16**5):05x}"
    prefix = _free_subnet()
    bridge = f"sbbr{tag}"
    client_pub = _keygen(root / "client_key")
    (root / "authorized_keys").write_text(client_pub + "\n")
    hosts = Hosts(
        [
            SshHost(f"host-{i}", f"sb-{tag}-{i}", f"{prefix}.{10 + i}", f"sbv{tag}{i}")
            for i in range(count)
        ],
        root / "ssh_config",
        f"{prefix}.1",
        root,
    )
    made_bridge = False
    made: list[SshHost] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        made_bridge = True
        _ip("addr", "add", f"{hosts.bridge_address}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        known, config = [], []
        for host in hosts.hosts:
            _ip("netns", "add", host.netns)
            made.append(host)
            peer = f"sbp{tag}{host.alias[-1]}"
            _ip("link", "add", host.link, "type", "veth", "peer", "name", peer)
            _ip("link", "set", host.link, "master", bridge)
            _ip("link", "set", host.link, "up")
            _ip("link", "set", peer, "netns", host.netns)
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", peer)
            _ip("-n", host.netns, "link", "set", peer, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            key = root / f"{host.alias}_key"
            host_pub = _keygen(key)
            known.append(f"{host.address} {host_pub}")
            sshd_config = root / f"{host.alias}_sshd_config"
            lines = [
                f"ListenAddress {host.address}",
                f"HostKey {key}",
                f"AuthorizedKeysFile {root / 'authorized_keys'}",
                "PidFile none",
                "StrictModes no",
                "UsePAM no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "AllowTcpForwarding yes",
                # A client gone with a cut link is noticed, so its forwarded port frees.
                "ClientAliveInterval 2",
                "ClientAliveCountMax 3",
                "MaxSessions 100",
                "MaxStartups 100",
            ]
            if set_env:
                lines.append("SetEnv " + " ".join(f"{k}={v}" for k, v in set_env.items()))
            sshd_config.write_text("\n".join(lines) + "\n")
            hosts.start_sshd(host, wait=False)
            config += [
                f"Host {host.alias}",
                f"  HostName {host.address}",
                "  User root",
                f"  IdentityFile {root / 'client_key'}",
                "  IdentitiesOnly yes",
                f"  UserKnownHostsFile {root / 'known_hosts'}",
                "  GlobalKnownHostsFile /dev/null",
                "  StrictHostKeyChecking yes",
                "  LogLevel ERROR",
                "",
            ]
        (root / "known_hosts").write_text("\n".join(known) + "\n")
        hosts.ssh_config.write_text("\n".join(config))
        for host in hosts.hosts:
            assert host.sshd is not None
            _wait_port(host.address, 22, host.sshd, root / f"{host.alias}_sshd.log")
        yield hosts
    finally:
        _kill_clients(hosts.ssh_config)
        for host in made:
            _kill_namespace(hosts, host)
            if host.sshd is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(host.sshd.pid, signal.SIGKILL)
                host.sshd.wait(timeout=10)
            _ip("link", "del", host.link, check=False)
            _ip("netns", "del", host.netns, check=False)
        if made_bridge:
            _ip("link", "del", bridge, check=False)

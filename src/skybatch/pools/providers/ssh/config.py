"""The ``provider: {type: ssh, ...}`` section and the host strings in it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from skybatch.pools.registry import ProviderConfig

__all__ = ["DEFAULT_REMOTE_DIR", "Host", "SshConfig", "parse_host"]

#: Where agents keep their files on a host, unless ``remote_dir`` says otherwise.
DEFAULT_REMOTE_DIR = "~/.skybatch-workers"

# [user@]host[:port], with an IPv6 address in brackets when a port follows it.
_HOST = re.compile(
    r"^(?:(?P<user>[^@\s:/]+)@)?(?P<name>\[[0-9A-Fa-f:.]+\]|[^@\s:/\[\]]+)(?::(?P<port>\d{1,5}))?$"
)


@dataclass(frozen=True)
class Host:
    """One entry of ``hosts:``: as written (how handles and messages name it) and split."""

    text: str
    name: str
    user: str | None = None
    port: int | None = None

    def destination(self) -> list[str]:
        """ssh's arguments for this host: options first, then ``--`` (what follows is
        never an option, whatever the name), the destination last."""
        args = []
        if self.port is not None:
            args += ["-p", str(self.port)]
        if self.user is not None:
            args += ["-l", self.user]
        return [*args, "--", self.name]


def parse_host(text: str) -> Host:
    m = _HOST.match(text)
    if m is None:
        raise ValueError(
            f"{text!r} is not a host: write an ssh config alias, host, user@host or user@host:port"
        )
    # ssh would take such a name for an option (x@-oProxyCommand=...); the user comes
    # first in the text, so its "-" is the text's.
    if text.startswith("-") or m["name"].startswith("-"):
        raise ValueError(f"{text!r} is not a host: a user or host name may not start with '-'")
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is not between 1 and 65535")
    return Host(text, m["name"].strip("[]"), m["user"], port)


def _path(value: str | None, field: str) -> str | None:
    if value is not None and not (value.startswith(("/", "~/")) or value == "~"):
        raise ValueError(
            f"{value!r} is relative: give {field} as an absolute path or one under ~/ "
            "(it is read where the server runs)"
        )
    return value


class SshConfig(ProviderConfig):
    """Workers on hosts the server reaches with the system's ``ssh``."""

    type: Literal["ssh"] = "ssh"
    hosts: list[str] = Field(min_length=1)
    #: A private key for every host (``ssh -i``); else ssh's own choice (agent, config).
    identity_file: str | None = None
    workers_per_host: int = Field(default=1, ge=1, le=1024)
    #: An interpreter on the hosts that already has this skybatch version installed;
    #: without it, the server ships its own skybatch into a venv on each host.
    python: str | None = None
    #: An ssh_config file used instead of ~/.ssh/config (``ssh -F``).
    ssh_config: str | None = None
    #: Where agents keep their files on the hosts (venvs, worker directories).
    remote_dir: str = DEFAULT_REMOTE_DIR

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for text in v:
            parse_host(text)
        twice = sorted({h for h in v if v.count(h) > 1})
        if twice:
            raise ValueError(
                f"{twice[0]!r} is listed twice; list each host once and raise "
                "workers_per_host for more workers on it"
            )
        return v

    @field_validator("identity_file", "ssh_config")
    @classmethod
    def _paths(cls, v: str | None, info: object) -> str | None:
        return _path(v, getattr(info, "field_name", "the path"))

    @field_validator("remote_dir")
    @classmethod
    def _remote_dir(cls, v: str) -> str:
        if not (v.startswith(("/", "~/"))) or "\n" in v or "'" in v:
            raise ValueError(
                f"{v!r}: give remote_dir as an absolute path or one under ~/ on the hosts, "
                "without quotes or newlines"
            )
        return v.rstrip("/")

    def parsed_hosts(self) -> list[Host]:
        return [parse_host(h) for h in self.hosts]

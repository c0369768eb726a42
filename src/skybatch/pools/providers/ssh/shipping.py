"""Bringing a host to the server's skybatch: a wheel made from the installed package,
installed with its dependencies into a venv on the host keyed by version and content."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Wheel", "install_script", "installed_wheel", "remote_path"]

#: The installed package: skybatch/ (this file is skybatch/pools/providers/ssh/shipping.py).
_PACKAGE = Path(__file__).resolve().parents[3]

_lock = threading.Lock()
_built: Wheel | None = None


@dataclass(frozen=True)
class Wheel:
    name: str
    data: bytes
    version: str
    #: A digest of the contents: two builds of one version (a checkout) get two venvs.
    digest: str

    @property
    def venv(self) -> str:
        return f"venv-{self.version}-{self.digest}"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def build_wheel() -> Wheel:
    """A wheel of the skybatch this process runs, from its installed files.

    Not ``pip wheel`` of a source tree: an installed wheel has none, and an editable
    install's may have moved on. The metadata (dependencies, entry points) is the
    installed distribution's own, so pip on the host installs what this one has.
    """
    dist = importlib.metadata.distribution("skybatch")
    version = dist.version
    info = f"skybatch-{version}.dist-info"
    files: list[tuple[str, bytes]] = []
    for path in sorted(_PACKAGE.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append((f"skybatch/{path.relative_to(_PACKAGE).as_posix()}", path.read_bytes()))
    metadata = (
        dist.read_text("METADATA") or f"Metadata-Version: 2.1\nName: skybatch\nVersion: {version}\n"
    )
    files.append((f"{info}/METADATA", metadata.encode()))
    entry_points = dist.read_text("entry_points.txt")
    if entry_points:
        files.append((f"{info}/entry_points.txt", entry_points.encode()))
    files.append(
        (
            f"{info}/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: skybatch\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
    )
    content = hashlib.sha256()
    for name, data in files:
        content.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files)
    record += f"{info}/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in [*files, (f"{info}/RECORD", record.encode())]:
            # A fixed date: the same files make the same wheel.
            entry = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(entry, data)
    return Wheel(
        f"skybatch-{version}-py3-none-any.whl", buf.getvalue(), version, content.hexdigest()[:12]
    )


def installed_wheel() -> Wheel:
    """The wheel of this process's skybatch, built once."""
    global _built
    with _lock:
        if _built is None:
            _built = build_wheel()
        return _built


def remote_path(path: str) -> str:
    """``path`` for the host's sh, quoted; a leading ``~/`` stays the remote user's home."""
    import shlex

    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def install_script(remote_dir: str, wheel: Wheel, check_only: bool) -> str:
    """sh that prints the venv's python once it holds ``wheel``; with ``check_only`` it
    prints nothing when the venv is not there yet, else it reads the wheel from stdin
    and installs it (and its dependencies, from the host's package index).

    One install at a time per host: two servers (or two pools) may ship at once, and
    ``flock`` on a file beside the venvs serializes them; a venv counts only once its
    marker is written, so a cut-short install is redone, not used.
    """
    root = remote_path(remote_dir)
    venv = f"{root}/{wheel.venv}"
    done = f"[ -f {venv}/.complete ] && {{ echo {venv}/bin/python; exit 0; }}"
    if check_only:
        return f"{done}; exit 0"
    stage = f"{root}/.incoming-{wheel.digest}"
    return "\n".join(
        [
            "set -e",
            f"mkdir -p {root}",
            f"chmod 700 {root}",
            f"exec 9>{root}/.install.lock",
            "command -v flock >/dev/null && flock 9",
            done,
            f"rm -rf {venv} {stage}",
            f"mkdir -p {stage}",
            f"cat > {stage}/{wheel.name}",
            f"python3 -m venv {venv} >&2",
            f"{venv}/bin/python -m pip install --disable-pip-version-check --no-input -q "
            f"{stage}/{wheel.name} >&2",
            f"rm -rf {stage}",
            f"touch {venv}/.complete",
            f"echo {venv}/bin/python",
        ]
    )

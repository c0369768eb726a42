"""Storage over fsspec: path resolution, ranged reads, atomic publish, error translation.

Every reader and writer goes through these few functions so that a new backend
(s3://, gs://, ...) only has to be right here.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from skybatch.errors import InputError, OutputError, SkyBatchError

__all__ = [
    "StagedFile",
    "filesystem",
    "is_local",
    "join",
    "read_range",
    "resolve",
    "translate_errors",
]


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def resolve(url: str) -> str:
    """Make a local path absolute against the *caller's* working directory.

    Readers and writers are built in the user's process and executed by the
    server and the agents, whose working directories differ.
    """
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path within it."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        scheme = url.split("://", 1)[0]
        raise SkyBatchError(f"cannot open {url}: no storage backend for {scheme}:// ({e})") from e
    return fs, path


def join(base: str, *parts: str) -> str:
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def dirname(url: str) -> str:
    if is_local(url):
        return os.path.dirname(url)
    return posixpath.dirname(url.rstrip("/"))


def basename(url: str) -> str:
    if is_local(url):
        return os.path.basename(url)
    return posixpath.basename(url.rstrip("/"))


@contextlib.contextmanager
def translate_errors(url: str, action: str, error: type[SkyBatchError]) -> Iterator[None]:
    """Turn an OS or fsspec error into ``error`` naming the URL and what failed."""
    try:
        yield
    except SkyBatchError:
        raise
    except FileNotFoundError as e:
        raise error(f"cannot {action} {url}: no such file or directory") from e
    except PermissionError as e:
        raise error(f"cannot {action} {url}: permission denied") from e
    except IsADirectoryError as e:
        raise error(f"cannot {action} {url}: it is a directory") from e
    except NotADirectoryError as e:
        raise error(f"cannot {action} {url}: a parent is not a directory") from e
    except OSError as e:
        raise error(f"cannot {action} {url}: {e.strerror or e}") from e


def read_range(url: str, start: int, end: int, storage_options: dict[str, Any] | None) -> bytes:
    """Bytes ``[start, end)`` of ``url``: one ranged read, never the whole object."""
    if is_local(url):
        # The hot path for local files: skip fsspec's layers.
        with translate_errors(url, "read", InputError), open(url, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, "read", InputError):
        data: bytes = fs.cat_file(path, start=start, end=end)
        return data


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None) -> None:
    if is_local(url):
        with translate_errors(url, "write", OutputError), open(url, "wb") as f:
            f.write(data)
        return
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, "write", OutputError):
        fs.pipe_file(path, data)


def exists(url: str, storage_options: dict[str, Any] | None) -> bool:
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, "check", OutputError):
        return bool(fs.exists(path))


def makedirs(url: str, storage_options: dict[str, Any] | None) -> None:
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, "create", OutputError):
        fs.makedirs(path, exist_ok=True)


def remove_tree(url: str, storage_options: dict[str, Any] | None) -> None:
    fs, path = filesystem(url, storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def remove_file(url: str, storage_options: dict[str, Any] | None) -> None:
    fs, path = filesystem(url, storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def check_writable(url: str, storage_options: dict[str, Any] | None) -> None:
    """Fail now, with the reason, if an output at ``url`` could not be written."""
    parent = dirname(url)
    makedirs(parent, storage_options)
    probe = join(parent, f".skybatch-probe-{uuid.uuid4().hex}")
    write_bytes(probe, b"", storage_options)
    remove_file(probe, storage_options)


class StagedFile:
    """A file written in full out of sight, then published at ``url`` in one step.

    Two phases so that several outputs of one job publish together: every
    writer stages, and only when all staged does any publish. Local files are
    renamed into place; other filesystems get a temporary object moved over
    (object stores get a true multipart publish with the cloud-storage work).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        self.url = url
        self.storage_options = storage_options
        self.fs, self.path = filesystem(url, storage_options)
        self.tmp = join(dirname(url), f".{basename(url)}.skybatch-{uuid.uuid4().hex}.tmp")
        self._tmp_path = filesystem(self.tmp, storage_options)[1]

    @contextlib.contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        with translate_errors(self.url, "write", OutputError):
            if isinstance(self.fs, LocalFileSystem):
                with open(self.tmp, "wb") as f:
                    yield f
            else:
                with self.fs.open(self._tmp_path, "wb") as f:
                    yield f

    def publish(self) -> None:
        with translate_errors(self.url, "publish", OutputError):
            if isinstance(self.fs, LocalFileSystem):
                os.replace(self.tmp, self.url)
            else:
                self.fs.mv(self._tmp_path, self.path)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.fs.rm_file(self._tmp_path)

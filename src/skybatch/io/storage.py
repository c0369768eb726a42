"""Storage over fsspec: path resolution, ranged reads, atomic publish, error translation.

Every reader and writer goes through these few functions so that a new backend
(s3://, gs://, ...) only has to be right here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import stat
import uuid
from collections.abc import Iterator
from typing import IO, Any, Protocol, cast

import fsspec
from fsspec.implementations.local import LocalFileSystem

from skybatch.errors import InputError, OutputError, SkyBatchError

__all__ = [
    "Staged",
    "StagedFile",
    "StagedMoves",
    "check_readable_location",
    "check_writable",
    "filesystem",
    "is_local",
    "is_object_store",
    "join",
    "read_range",
    "resolve",
    "translate_errors",
]

#: The pip extra that brings each scheme's fsspec backend.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
#: Schemes whose writes are multipart uploads that complete only on commit.
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
#: Size of the first multipart parts when publishing to an object store: the
#: server's memory per output being published is a few parts (the cloud
#: libraries copy each part two or three times on its way out). Every 1,000
#: parts the size doubles, so S3's limit of 10,000 parts is never reached.
PART_SIZE = 8 * 1024 * 1024
PARTS_PER_SIZE = 1000
#: Bytes fetched per request by a sequential pass over an object (index, reduce).
READ_BLOCK = 4 * 1024 * 1024
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_object_store(url: str) -> bool:
    return protocol(url) in _OBJECT_STORES


def bucket_of(url: str) -> str:
    """``s3://bucket/key`` -> ``bucket``."""
    return url.split("://", 1)[1].split("/", 1)[0]


def resolve(url: str) -> str:
    """Make a local path absolute against the *caller's* working directory.

    Readers and writers are built in the user's process and executed by the
    server and the agents, whose working directories differ. ``file://`` and
    fsspec's ``local://`` become plain paths (``file://localhost/x`` is ``/x``),
    so that every check that a location is local sees them so.
    """
    if url.startswith("file://localhost/"):
        url = url[len("file://localhost") :]
    elif url.startswith(("file://", "local://")):
        url = url.split("://", 1)[1]
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path within it."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        scheme = protocol(url)
        extra = _EXTRAS.get(scheme)
        how = f"pip install 'skybatch[{extra}]'" if extra else f"({e})"
        raise SkyBatchError(
            f"cannot open {url}: {scheme}:// support is not installed; {how}"
        ) from None
    except (ValueError, TypeError) as e:
        raise SkyBatchError(f"cannot open {url}: {e}") from None
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
        what = "no such key" if is_object_store(url) else "no such file or directory"
        raise error(f"cannot {action} {url}: {what}") from e
    except PermissionError as e:
        if is_object_store(url):
            raise error(
                f"cannot {action} {url}: access denied; check the credentials "
                "(storage_options or the cloud's environment variables) and the bucket's "
                "permissions"
            ) from e
        raise error(f"cannot {action} {url}: permission denied") from e
    except IsADirectoryError as e:
        raise error(f"cannot {action} {url}: it is a directory") from e
    except NotADirectoryError as e:
        raise error(f"cannot {action} {url}: a parent is not a directory") from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise error(f"cannot {action} {url}: no space left on device") from e
        raise error(f"cannot {action} {url}: {e.strerror or e}") from e
    except Exception as e:
        # Cloud SDKs raise their own types (botocore's EndpointConnectionError, ...).
        name = type(e).__name__
        if "Connect" in name or "Endpoint" in name:
            raise error(
                f"cannot {action} {url}: cannot reach the storage endpoint ({e}); check "
                "endpoint_url in storage_options or the cloud's environment variables"
            ) from e
        if "Credential" in name or "Auth" in name:
            raise error(f"cannot {action} {url}: no usable credentials ({e})") from e
        raise error(f"cannot {action} {url}: {name}: {e}") from e


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


def open_stream(
    url: str, storage_options: dict[str, Any] | None, compression: str | None = None
) -> IO[bytes]:
    """``url`` opened for one sequential pass with bounded memory.

    fsspec's object-store files default to 50 MB read-ahead blocks, several
    copies of which a pass holds at once; small blocks keep the indexer and
    the reduce to a few megabytes whatever the object's size.
    """
    fs, path = filesystem(url, storage_options)
    f: IO[bytes] = fs.open(
        path, "rb", block_size=READ_BLOCK, cache_type="readahead", compression=compression
    )
    return f


def write_bytes(
    url: str, data: bytes, storage_options: dict[str, Any] | None, sync: bool = False
) -> None:
    """Write ``url``; ``sync``: locally, on disk (file and name) when this returns.

    Object stores need nothing for that: a PUT is durable once answered.
    """
    if is_local(url):
        with translate_errors(url, "write", OutputError):
            with os.fdopen(create_local(url, url), "wb") as f:
                f.write(data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            if sync:
                fsync_dir(os.path.dirname(url))
        return
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, "write", OutputError):
        fs.pipe_file(path, data)


def create_local(path: str, url: str) -> int:
    """A new local file at ``path`` (written for output ``url``), open for writing.

    Never written through a symbolic link, nor into a file someone else made: in a
    shared directory another user may plant either at a name we will use. What is
    there (our own leftover, or a planted link) is unlinked, which removes a link
    and not its target, and the file is made afresh; a name taken again meanwhile
    fails instead of being followed. The first try is the only syscall when the
    name is free (every part).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.suppress(FileExistsError):
        return os.open(path, flags, 0o666)  # the umask applies, as to open(path, "wb")
    try:
        os.unlink(path)
    except PermissionError:
        raise OutputError(
            f"cannot write {url}: {path} is in the way and belongs to someone else; remove "
            "it, or choose another output directory"
        ) from None
    try:
        return os.open(path, flags, 0o666)
    except FileExistsError:
        raise OutputError(
            f"cannot write {url}: {path} was created again by another process while skybatch "
            f"replaced it; check who else writes in {os.path.dirname(path)}"
        ) from None


def _fsync_path(path: str) -> None:
    """Sync a local file's data (or a directory of files, each) to disk."""
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            _fsync_path(os.path.join(path, name))
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make the names created in or renamed into local directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exists(url: str, storage_options: dict[str, Any] | None) -> bool:
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, "check", OutputError):
        return bool(fs.exists(path))


def makedirs(url: str, storage_options: dict[str, Any] | None) -> None:
    if is_object_store(url):
        return  # no directories in object stores; and s3fs would create a missing bucket
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, "create", OutputError):
        fs.makedirs(path, exist_ok=True)


def make_staging_root(url: str, storage_options: dict[str, Any] | None) -> None:
    """Create a job's staging root ``<output dir>/.skybatch/<deployment>-<job>``.

    Locally the output directory may be shared with other users, who must not get
    to change a job's parts: the root is ours alone (0700), and one that is there
    already is used only if we made it and nobody else can write it (a resume, or
    a job's second output). ``.skybatch`` is made sticky and open to all (1777,
    like /tmp): other deployments stage beside ours but cannot rename ours away.
    Object stores have no directories to plant; nothing is created there.
    """
    if not is_local(url):
        makedirs(url, storage_options)
        return
    path = resolve(url)
    area = os.path.dirname(path)
    me = os.geteuid()
    with translate_errors(url, "create", OutputError):
        os.makedirs(os.path.dirname(area), exist_ok=True)
        try:
            os.mkdir(area, 0o700)
            os.chmod(area, 0o1777)  # explicitly: the umask would take others' write off
        except FileExistsError:
            st = os.lstat(area)
            mode = stat.S_IMODE(st.st_mode)
            if not stat.S_ISDIR(st.st_mode):
                raise OutputError(
                    f"{area} is not a directory (a symbolic link or a file); remove it, or "
                    "choose another output directory"
                ) from None
            if not mode & stat.S_ISVTX:
                if st.st_uid != me:
                    raise OutputError(
                        f"staging directory {area} belongs to uid {st.st_uid}, not you "
                        f"(uid {me}), and is not sticky (mode {mode:04o}), so others could "
                        "swap this job's staging area; remove it, or choose another output "
                        "directory"
                    ) from None
                if mode & _WRITABLE_BY_OTHERS:
                    os.chmod(area, mode | stat.S_ISVTX)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            if not stat.S_ISDIR(st.st_mode):
                raise OutputError(
                    f"staging area {path} is not a directory (a symbolic link or a file); "
                    "remove it and submit the job again"
                ) from None
            if st.st_uid != me:
                raise OutputError(
                    f"staging area {path} was made by uid {st.st_uid}, not you (uid {me}), "
                    "so its parts may be someone else's; remove it and submit the job again"
                ) from None
            if mode & _WRITABLE_BY_OTHERS:
                raise OutputError(
                    f"staging area {path} is writable by others (mode {mode:04o}), so its "
                    "parts may have been changed; remove it and submit the job again"
                ) from None
            if mode & 0o077:
                os.chmod(path, 0o700)


def remove_tree(url: str, storage_options: dict[str, Any] | None) -> None:
    fs, path = filesystem(url, storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def remove_file(url: str, storage_options: dict[str, Any] | None) -> None:
    fs, path = filesystem(url, storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def check_bucket(
    url: str, storage_options: dict[str, Any] | None, error: type[SkyBatchError]
) -> None:
    """Fail with "bucket does not exist" rather than a vaguer "no such key"."""
    if not is_object_store(url):
        return
    fs, _ = filesystem(url, storage_options)
    bucket = bucket_of(url)
    with translate_errors(f"{protocol(url)}://{bucket}", "open bucket", error):
        try:
            if protocol(url) in ("s3", "s3a"):
                fs.call_s3("head_bucket", Bucket=bucket)  # s3fs's exists() hides errors
            else:
                fs.info(bucket)  # not ls: listing a big bucket takes many requests
        except FileNotFoundError:
            raise error(
                f"bucket {bucket!r} of {url} does not exist; create it or fix the URL"
            ) from None


def check_readable_location(url: str, storage_options: dict[str, Any] | None) -> Any:
    """``fs.info`` of an input URL, failing with one line saying what is wrong."""
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, "read input", InputError):
        try:
            return fs.info(path)
        except FileNotFoundError:
            check_bucket(url, storage_options, InputError)
            raise


def check_writable(url: str, storage_options: dict[str, Any] | None) -> None:
    """Fail now, with the reason, if an output at ``url`` could not be written.

    On an object store this checks the bucket exists and writes and deletes a
    probe object, which proves the credentials may write there.
    """
    check_bucket(url, storage_options, OutputError)
    parent = dirname(url)
    makedirs(parent, storage_options)
    probe = join(parent, f".skybatch-probe-{uuid.uuid4().hex}")
    write_bytes(probe, b"", storage_options)
    with translate_errors(url, "delete a probe object beside", OutputError):
        remove_file(probe, storage_options)


def write_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None) -> None:
    """Write ``url`` so that a concurrent reader sees the old or the new content, never half."""
    if is_local(url):
        tmp = f"{url}.{uuid.uuid4().hex}.tmp"
        with translate_errors(url, "write", OutputError):
            try:
                with os.fdopen(create_local(tmp, url), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, url)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            fsync_dir(os.path.dirname(url))
        return
    write_bytes(url, data, storage_options)  # an object PUT is atomic


class Staged(Protocol):
    """An output written out of sight; ``publish`` makes it visible, ``discard`` drops it."""

    def publish(self) -> None: ...

    def discard(self) -> None: ...


class StagedMoves:
    """A directory output made of staged files, published by moving them into place.

    Locally each move is a rename. On object stores it is a server-side copy
    (run concurrently by fsspec) and a delete of the staged objects; no bytes
    pass through this process. What was in the directory before is removed
    first (publishing over it was allowed by ``overwrite``).
    """

    def __init__(
        self, directory: str, moves: list[tuple[str, str]], storage_options: dict[str, Any] | None
    ) -> None:
        self.directory = directory
        self.moves = moves
        self.storage_options = storage_options
        #: Copy instead of move (a partial reduce_results: a resume still needs the parts).
        self.keep_sources = False

    def publish(self) -> None:
        fs, root = filesystem(self.directory, self.storage_options)
        with translate_errors(self.directory, "publish", OutputError):
            if fs.exists(root):
                fs.rm(root, recursive=True)
            if is_local(self.directory):
                os.makedirs(self.directory, exist_ok=True)  # exists even with no files
                targets = {self.directory}
                for src, dst in self.moves:
                    targets.add(os.path.dirname(dst))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    if self.keep_sources:
                        _copy_synced(src, dst)
                    else:
                        # Parts are not synced when written (io/base.py write_part):
                        # on disk before the rename publishes them.
                        _fsync_path(src)
                        os.replace(src, dst)
                for target in sorted(targets):
                    fsync_dir(target)
                fsync_dir(os.path.dirname(self.directory))
                return
            if not self.moves:
                return
            srcs = [filesystem(src, self.storage_options)[1] for src, _ in self.moves]
            dsts = [filesystem(dst, self.storage_options)[1] for _, dst in self.moves]
            fs.copy(srcs, dsts)
            if not self.keep_sources:
                fs.rm(srcs)
            fs.invalidate_cache()

    def discard(self) -> None:
        """The staged files stay with the job's parts, removed by its cleanup."""


def _copy_synced(src: str, dst: str) -> None:
    with open(src, "rb") as fin, os.fdopen(create_local(dst, dst), "wb") as fout:
        shutil.copyfileobj(fin, fout, 1024 * 1024)
        fout.flush()
        os.fsync(fout.fileno())


class _Output:
    """The staged file as a writer's ``reduce`` sees it.

    A reduce writes while it reads parts; a failed write must name the output
    (``cannot write out.jsonl: no space left on device``), not the part being read.
    """

    closed = False

    def __init__(self, f: Any, url: str) -> None:
        self._f = f
        self._url = url

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        n: int = self._f.tell()
        return n

    def flush(self) -> None:
        with translate_errors(self._url, "write", OutputError):
            self._f.flush()

    def write(self, data: bytes) -> int:
        with translate_errors(self._url, "write", OutputError):
            n: int = self._f.write(data)
            return n


class _GrowingParts:
    """Writes to an fsspec upload, doubling its part size every PARTS_PER_SIZE parts."""

    def __init__(self, upload: Any) -> None:
        self.upload = upload
        self.written = 0
        self.grow_at = PARTS_PER_SIZE * upload.blocksize

    # What pyarrow and shutil look for in a writable file.
    closed = False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        """Parts go out as they fill; nothing to do."""

    def write(self, data: bytes) -> int:
        n: int = self.upload.write(data)
        self.written += len(data)
        if self.written >= self.grow_at:
            self.upload.blocksize *= 2
            self.grow_at = self.written + PARTS_PER_SIZE * self.upload.blocksize
        return n


class StagedFile:
    """A file written in full out of sight, then published at ``url`` in one step.

    Two phases so that several outputs of one job publish together: every
    writer stages, and only when all staged does any publish.

    - Local files are written to a temporary name and renamed into place.
    - Object stores (S3, GCS, Azure) get one multipart (resumable) upload to
      the final key, with parts of :data:`PART_SIZE` sent as they fill, so
      memory stays bounded; ``publish`` completes the upload, and until then
      readers see no object (or the previous one). ``discard`` aborts it.
    - Other filesystems get a temporary file moved over the final path.
    """

    def __init__(
        self, url: str, storage_options: dict[str, Any] | None, name: str | None = None
    ) -> None:
        self.url = url
        self.storage_options = storage_options
        self.fs, self.path = filesystem(url, storage_options)
        self.multipart = is_object_store(url)
        # ``name`` (the job's ``<deployment>-<job>``) makes the temporary name
        # deterministic: a reduce restarted after a crash replaces its
        # predecessor's file instead of leaving it beside the output for good.
        tag = name or uuid.uuid4().hex
        self.tmp = join(dirname(url), f".{basename(url)}.skybatch-{tag}.tmp")
        self._tmp_path = filesystem(self.tmp, storage_options)[1]
        self._upload: Any = None

    @contextlib.contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        with translate_errors(self.url, "write", OutputError):
            if isinstance(self.fs, LocalFileSystem):
                # The temporary name is predictable (see __init__): a stale file or a
                # link planted there is replaced, never written through.
                with os.fdopen(create_local(self.tmp, self.url), "wb") as f:
                    yield cast(IO[bytes], _Output(f, self.url))
                    f.flush()
                    os.fsync(f.fileno())  # on disk before the rename publishes it
            elif self.multipart:
                self._upload = self.fs.open(self.path, "wb", autocommit=False, block_size=PART_SIZE)
                yield cast(IO[bytes], _Output(_GrowingParts(self._upload), self.url))
                self._upload.close()  # sends the last part; commit() completes the upload
            else:
                with self.fs.open(self._tmp_path, "wb") as f:
                    yield cast(IO[bytes], _Output(f, self.url))

    def publish(self) -> None:
        with translate_errors(self.url, "publish", OutputError):
            if isinstance(self.fs, LocalFileSystem):
                os.replace(self.tmp, self.url)
                fsync_dir(os.path.dirname(self.url))
            elif self.multipart:
                self._upload.commit()
                self.fs.invalidate_cache(self.path)
            else:
                self.fs.mv(self._tmp_path, self.path)

    def discard(self) -> None:
        if self.multipart:
            upload, self._upload = self._upload, None
            if upload is not None:
                with contextlib.suppress(Exception):
                    upload.discard()
                # A file object left open would complete the upload when collected.
                upload.closed = True
            return
        with contextlib.suppress(OSError):
            self.fs.rm_file(self._tmp_path)

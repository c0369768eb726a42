"""Checks of a submitted job's reader and writer specs that need no state: each names
the field the request got wrong, before the job exists."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from typing import Any

from skybatch.errors import ConfigError, SkyBatchError
from skybatch.io import storage
from skybatch.io.base import OutputWriter
from skybatch.io.registry import reader_from_spec
from skybatch.server.store import JobRecord, overlap
from skybatch.wire import JobSubmit

__all__ = ["absent_local", "check_same_job", "disjoint", "require_absolute", "spec_field"]


@contextlib.contextmanager
def spec_field(field: str) -> Iterator[None]:
    """A reader or writer spec that does not load is the request's fault: say which."""
    try:
        yield
    except SkyBatchError:
        raise
    except Exception as e:  # from_spec and user classes can raise anything
        detail = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ConfigError(
            f"{field}: invalid spec ({detail}); pass a skybatch reader or writer"
        ) from None


def require_absolute(field: str, path: object) -> None:
    """A local path must come absolute: relative to the server's working directory
    it would name a place the user never meant (the Python client resolves paths)."""
    if not isinstance(path, str):
        return
    plain = path
    if path.startswith("file://localhost/"):
        plain = path[len("file://localhost") :]
    elif path.startswith(("file://", "local://")):
        plain = path.split("://", 1)[1]
    elif "://" in path:
        return
    if not plain.startswith("/"):
        raise ConfigError(
            f"{field}.path: {path!r} is not an absolute path; send an absolute path or a "
            "URL such as s3://bucket/key"
        )


def disjoint(keys: list[str]) -> None:
    """Two outputs of one job must not be one file, nor one inside the other."""
    for n, key in enumerate(keys):
        for earlier in keys[:n]:
            both = overlap(earlier, key)
            if both == key:
                raise ConfigError(f"two outputs of this job write {key}; give each its own path")
            if both is not None:
                raise ConfigError(
                    f"two outputs of this job overlap: {both}; give each its own path"
                )


def absent_local(writers: list[OutputWriter]) -> list[str]:
    """The local outputs not there yet: a directory the job makes for one goes if the
    job ends without publishing (a later submit of a file there would find a directory)."""
    return [w.path for w in writers if storage.is_local(w.path) and not os.path.lexists(w.path)]


def _user_spec(reader_spec: dict[str, Any]) -> dict[str, Any]:
    """A stored reader spec without what the server added (``_files``, ``_scratch``)."""
    return {k: v for k, v in reader_spec.items() if not k.startswith("_")}


def check_same_job(job: JobRecord, req: JobSubmit) -> None:
    """A resume's request must describe the job that ran: same input, batches, outputs."""
    old = job.spec
    if req.items is not None:
        if hashlib.sha256(req.items.encode()).hexdigest() != old.get("items_sha256"):
            raise ConfigError(
                f"job {job.id} ran over other items; resume it with the same items, or "
                "submit a new job"
            )
    elif req.reader != _user_spec(old["reader"]):
        raise ConfigError(
            f"job {job.id} read {reader_from_spec(old['reader']).describe()}; resume it with "
            "the same input, or submit a new job"
        )
    if req.batch_size != old["batch_size"]:
        raise ConfigError(
            f"job {job.id} ran with batch_size={old['batch_size']}; resume it with the same "
            f"batch_size (got {req.batch_size}), or submit a new job"
        )
    if old.get("results_in_memory") and not req.writers:
        return
    old_paths = [w["path"] for w in old["writers"]]
    if [w.get("path") for w in req.writers] != old_paths or [
        w.get("kind") for w in req.writers
    ] != [w["kind"] for w in old["writers"]]:
        raise ConfigError(
            f"job {job.id} wrote {old_paths}; resume it with the same outputs, or submit a new job"
        )

"""Output claims: one owner per output location, compared in one spelling.

A job claims what it writes in the transaction that creates or reopens it and
releases it when it ends; every store keeps claims by :func:`output_key` and
refuses one that :func:`overlap` finds held by another unfinished job.
"""

from __future__ import annotations

import os
from typing import Any

from skybatch.errors import ConflictError
from skybatch.io import storage

__all__ = ["OutputClaimed", "claimed_outputs", "output_key", "overlap"]


class OutputClaimed(ConflictError):
    """Another unfinished job owns one of the outputs (from create_job or reopen_job):
    ``path``, the other job's claim, is ``wanted`` or holds it or lies inside it."""

    def __init__(self, path: str, job_id: int, wanted: str | None = None) -> None:
        self.path = path
        self.job_id = job_id
        self.wanted = wanted or path
        super().__init__(f"job {job_id} is already writing {overlap(path, self.wanted) or path}")


def output_key(url: str) -> str:
    """The one spelling of where ``url`` writes, as outputs are claimed.

    Local paths (plain, ``file://``, ``local://``) go through symbolic links
    (``os.path.realpath`` resolves the components that exist and keeps the rest);
    object-store URLs stay as written, without a trailing slash (``s3a`` is ``s3``
    and ``gcs`` is ``gs``).
    """
    url = storage.resolve(url)
    if "://" not in url:
        return os.path.realpath(url)
    scheme, rest = url.split("://", 1)
    return f"{_SAME_STORE.get(scheme, scheme)}://{rest.rstrip('/')}"


_SAME_STORE = {"s3a": "s3", "gcs": "gs"}


def overlap(a: str, b: str) -> str | None:
    """How output keys ``a`` and ``b`` overlap, said from ``a``; None if they do not."""
    if a == b:
        return a
    if b.startswith(a + "/"):
        return f"{a}, which holds {b}"
    if a.startswith(b + "/"):
        return f"{a}, inside {b}"
    return None


def claimed_outputs(spec: dict[str, Any]) -> list[str]:
    """The keys (``output_key``) of what a job's spec writes: its outputs and its
    errors output."""
    paths = [w["path"] for w in spec["writers"]]
    if spec.get("errors"):
        paths.append(spec["errors"]["path"])
    return [output_key(p) for p in paths]

"""The mapper's output, as agents ship it: one log per job and worker, rotated at
``LOG_FILE_BYTES`` (one rotated file kept), read in pages by offsets that count all of
a worker's output, so they stay valid across rotations."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from skybatch import defaults
from skybatch.errors import DiskFullError
from skybatch.server.jobs.health import Health
from skybatch.server.jobs.runtime import Runtime
from skybatch.server.store import JobRecord

__all__ = ["Logs"]


def _log_rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def _log_sidecar(path: Path) -> Path:
    """Holds where the current log file starts in the worker's whole output."""
    return path.with_name(path.name + ".base")


class Logs:
    def __init__(self, rt: Runtime, health: Health) -> None:
        self.rt = rt
        self.ctx = rt.ctx
        self.health = health
        self._bases: dict[Path, int] = {}

    def append_log(self, job_id: int, worker_index: int, data: bytes) -> None:
        """Add to a worker's log of the job: at most ``LOG_FILE_BYTES`` in the current
        file plus one rotated file. A full disk answers 507 and shows on the job."""
        self.rt.get(job_id)
        path = self.ctx.home.job_log(job_id, worker_index)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                size = f.tell()
                rotate = size > 0 and size + len(data) > defaults.LOG_FILE_BYTES
                if not rotate:
                    try:
                        f.write(data)
                        f.flush()
                    except OSError:
                        with contextlib.suppress(OSError):
                            f.truncate(size)  # no half chunk: the agent counts it as dropped
                        raise
            if rotate:
                self._rotate(path, size)
                with open(path, "ab") as f:
                    f.write(data)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            message = (
                f"cannot write the job's log {path}: no space left on device; free space "
                "there (the mapper's output is dropped meanwhile, and counted)"
            )
            self.health.set_health(job_id, "logs", message)
            raise DiskFullError(message) from None
        self.health.set_health(job_id, "logs", None)
        self.ctx.notifier.notify(("log", job_id))

    def read_logs(
        self, job_id: int, worker: int | None, offsets: dict[int, int]
    ) -> tuple[list[tuple[int, bytes, int, bool]], JobRecord]:
        """New log bytes per worker from the given offsets: (worker, data, next offset,
        whether there is more to read now), at most ``LOG_PAGE_BYTES`` in all.

        Offsets count all of a worker's output, rotated and dropped included, so they
        stay valid across rotations. While the job runs only whole lines are
        returned, so a follower never splits a line (or a UTF-8 character) in two.
        """
        job = self.rt.get(job_id)
        root = self.ctx.home.job_log(job_id, 0).parent
        if not root.exists():
            return [], job
        paths = {int(p.stem.split("-", 1)[1]): p for p in root.glob("worker-*.log")}
        chunks = []
        budget = defaults.LOG_PAGE_BYTES
        for index, path in sorted(paths.items()):
            if worker is not None and index != worker:
                continue
            offset = offsets.get(index, 0)
            if budget <= 0:
                chunks.append((index, b"", offset, True))
                continue
            data, end, more = self._read(path, offset, not job.status.finished, budget)
            budget -= len(data)
            chunks.append((index, data, end, more))
        return chunks, job

    def _base(self, path: Path) -> int:
        """Where ``path`` (a worker's current log) starts in all of that worker's output."""
        base = self._bases.get(path)
        if base is None:
            try:
                base = int(_log_sidecar(path).read_text())
            except (OSError, ValueError):
                base = 0
            self._bases[path] = base
        return base

    def _rotate(self, path: Path, size: int) -> None:
        """The current log becomes the rotated one; the rotated one before is dropped."""
        base = self._base(path) + size
        sidecar = _log_sidecar(path)
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        tmp.write_text(str(base))
        os.replace(tmp, sidecar)
        os.replace(path, _log_rotated(path))
        self._bases[path] = base

    def _read(
        self, path: Path, offset: int, whole_lines: bool, page: int
    ) -> tuple[bytes, int, bool]:
        base = self._base(path)
        rotated = _log_rotated(path)
        try:
            start = base - rotated.stat().st_size  # the oldest byte still kept
        except OSError:
            start = base
        note = b""
        if offset < start:
            cap = defaults.LOG_FILE_BYTES
            note = (
                f"[skybatch: {start - offset} bytes of this worker's output were dropped here; "
                f"the server keeps its last {cap} to {2 * cap} bytes per job "
                "(SKYBATCH_LOG_FILE_BYTES)]\n"
            ).encode()
            offset = start
        from_rotated = offset < base
        try:
            with open(rotated if from_rotated else path, "rb") as f:
                f.seek(offset - (start if from_rotated else base))
                data = f.read(page)
        except FileNotFoundError:
            data = b""
        full_page = len(data) == page
        if full_page or (whole_lines and not from_rotated):
            cut = data.rfind(b"\n") + 1
            if cut:
                data = data[:cut]
            elif not full_page:
                data = b""  # a line still being written
        return note + data, offset + len(data), full_page or from_rotated

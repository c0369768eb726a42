"""The one exception tree of skybatch.

Every error a user can cause or see is a :class:`SkyBatchError`; lower libraries'
errors (fsspec, sqlite3, httpx, pydantic, yaml) are translated where they enter.
Each message is one line that says what is wrong and how to fix it, except
:class:`JobFailedError`, whose message carries the mapper's tracebacks.

Every class also derives from the built-in type Sky Batch raises in the matching
situation, so ported code's ``except ValueError`` / ``except RuntimeError`` still
catches it: what the caller got wrong (arguments, a mapper, an input, a job to
resume) is a ``ValueError``, what failed while running is a ``RuntimeError``.
:class:`NotFoundError` is both: Sky Batch raises ``RuntimeError`` for a missing
pool or job and ``ValueError`` for a missing job to resume from.

::

    SkyBatchError                           built-in base
    ├── ConfigError            bad arguments to the API or the CLI          ValueError
    │   └── PoolSpecError      pool YAML that does not validate             ValueError
    ├── MapperError            a @remote_function that cannot be shipped    ValueError
    ├── InputError             input missing, unreadable or malformed       ValueError
    ├── OutputError            output exists, is not writable, or failed    RuntimeError
    │                          to publish
    ├── NotFoundError          no such pool, job or worker                  ValueError, RuntimeError
    ├── ConflictError          the request clashes with current state       ValueError
    │                          (e.g. resuming a job that still runs)
    ├── PoolError              a pool could not be brought up               RuntimeError
    ├── ServerError            the server could not be started or reached   RuntimeError
    │   ├── AuthError          the token was refused
    │   └── DiskFullError      the server's disk (SKYBATCH_HOME) is full
    └── JobError               a job did not succeed                        RuntimeError
        ├── JobFailedError     ... because its batches failed
        └── JobCancelledError  ... because it was cancelled
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "ConflictError",
    "DiskFullError",
    "InputError",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "MapperError",
    "NotFoundError",
    "OutputError",
    "PoolError",
    "PoolSpecError",
    "ServerError",
    "SkyBatchError",
    "error_from_payload",
]


class SkyBatchError(Exception):
    """Root of every skybatch error."""

    #: HTTP status the server answers with when this error ends a request.
    http_status = 400


class ConfigError(SkyBatchError, ValueError):
    """An argument to the API or the CLI is invalid."""


class PoolSpecError(ConfigError):
    """A pool YAML file does not validate."""


class MapperError(SkyBatchError, ValueError):
    """A mapper function cannot be shipped to workers."""


class InputError(SkyBatchError, ValueError):
    """The input is missing, unreadable or malformed."""


class OutputError(SkyBatchError, RuntimeError):
    """The output cannot be written or published."""


class NotFoundError(SkyBatchError, ValueError, RuntimeError):
    """No such pool, job or worker."""

    http_status = 404


class ConflictError(SkyBatchError, ValueError):
    """The request clashes with the current state (e.g. a stale lease)."""

    http_status = 409


class PoolError(SkyBatchError, RuntimeError):
    """A pool could not be brought up."""


class ServerError(SkyBatchError, RuntimeError):
    """The server could not be started, reached, or failed internally."""

    http_status = 500


class AuthError(ServerError):
    """The server refused the token."""

    http_status = 401


class DiskFullError(ServerError):
    """The server cannot write its state or logs: no space left on their file system."""

    http_status = 507


class JobError(SkyBatchError, RuntimeError):
    """A job did not succeed."""

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobFailedError(JobError):
    """A job failed: a batch exhausted its retries, or the input was malformed."""


class JobCancelledError(JobError):
    """A job was cancelled."""


_BY_NAME: dict[str, type[SkyBatchError]] = {
    cls.__name__: cls
    for cls in (
        SkyBatchError,
        ConfigError,
        PoolSpecError,
        MapperError,
        InputError,
        OutputError,
        NotFoundError,
        ConflictError,
        PoolError,
        ServerError,
        AuthError,
        DiskFullError,
    )
}


def error_from_payload(kind: str, message: str) -> SkyBatchError:
    """Rebuild the error the server raised from its JSON error body."""
    return _BY_NAME.get(kind, ServerError)(message)

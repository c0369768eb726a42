"""Defaults in one place; each can be overridden where noted."""

from __future__ import annotations

import os


def _env_bytes(name: str, default: int) -> int:
    """A byte count from the environment (read once, at import), else ``default``."""
    try:
        return max(1, int(os.environ[name]))
    except (KeyError, ValueError):
        return default


#: Retries after a batch's first mapper failure before the batch (and the job) fails.
MAX_RETRIES = 3
#: Backoff before retry n is ``RETRY_BACKOFF * 2 ** (n - 1)`` seconds: 2, 4, 8.
RETRY_BACKOFF = 2.0
#: Failures not caused by the mapper (a lost worker, an expired lease, the first time a
#: batch's runner is killed by a signal) do not cost a retry, up to this many per batch,
#: so nothing retries forever. A batch whose runner is killed again costs a retry each time.
MAX_SYSTEM_FAILURES = 10

#: A lease lives this long unless a heartbeat renews it.
LEASE_TTL = 30.0
#: Agents renew their leases (and learn of cancellations) this often.
HEARTBEAT_INTERVAL = 1.0
#: How long a lease request waits on the server for work before answering "none".
LEASE_WAIT = 20.0
#: The most batches one lease request takes (agents with short batches ask for several).
LEASE_MAX_BATCHES = 64
#: An agent asks for as many batches as its runner gets through in about this long
#: (by its recent batch times), so a request's cost is shared by enough work.
LEASE_GROUP_SECONDS = 0.25
#: ...and no more than this many bytes of input among them.
LEASE_GROUP_BYTES = 64 * 1024 * 1024
#: An agent commits a lease's batches together, waiting at most this long for the
#: rest of them once the first is done (progress shows them a little later).
COMMIT_GROUP_WAIT = 0.5
#: How often the server checks lease expiry and asks providers whether workers live.
MONITOR_INTERVAL = 0.5
#: A runner that ignores SIGTERM is killed this long after it.
KILL_GRACE = 3.0
#: An agent that cannot reach its server for this long exits (no orphans forever).
ORPHAN_TIMEOUT = 600.0

#: Bytes the indexer reads from the input per chunk.
INDEX_CHUNK = 4 * 1024 * 1024
#: Decompressed bytes per scratch chunk of a compressed input (see JsonReader).
SPILL_CHUNK = 8 * 1024 * 1024
#: Batches the indexer hands to the scheduler at once (workers start before it ends).
INDEX_FLUSH_BATCHES = 64
#: The longest input line (JSONL) or record (CSV) the indexer holds, in bytes: a longer
#: one fails the job naming its file and byte offset, instead of filling the server's
#: memory. Override with ``SKYBATCH_MAX_LINE_BYTES`` in the server's environment.
MAX_LINE_BYTES = _env_bytes("SKYBATCH_MAX_LINE_BYTES", 256 * 1024 * 1024)
#: A job whose indexing starts this many times without adding a batch (server restarts
#: mid-index, which the input itself may cause) fails instead of starting again.
MAX_INDEX_STARTS = 2

#: How long a client waits for a server it started to answer.
SERVER_START_TIMEOUT = 30.0

#: The server keeps at most this much of each worker's output per job in the current
#: log file, plus one rotated file of the same size; older output is dropped (and
#: said so when read). Override with ``SKYBATCH_LOG_FILE_BYTES`` (read by the server).
LOG_FILE_BYTES = _env_bytes("SKYBATCH_LOG_FILE_BYTES", 10 * 1024 * 1024)
#: One logs reply carries at most this much per worker; clients ask again for the rest.
LOG_PAGE_BYTES = 1024 * 1024
#: An agent sends a job's output in requests of at most this size.
LOG_SHIP_BYTES = 1024 * 1024
#: Output an agent holds per job while it cannot send it; beyond this it is dropped
#: and counted (a marker line says how much). Override with ``SKYBATCH_LOG_BUFFER_BYTES``.
LOG_BUFFER_BYTES = _env_bytes("SKYBATCH_LOG_BUFFER_BYTES", 8 * 1024 * 1024)
#: An agent's log request is tried once and gives up after this long: logs are best
#: effort and never hold a commit back (after a failed one, commits do not wait on
#: logs at all until a log request succeeds again).
LOG_SHIP_TIMEOUT = 2.0
#: Longest pause between an agent's retries of a part it cannot write (disk full).
WRITE_RETRY_MAX_DELAY = 5.0

#: The largest part an agent uploads through the server's relay (a worker that cannot
#: see a local output's directory); the server streams it to disk, so this bounds the
#: disk one request fills, not the server's memory.
RELAY_PART_BYTES = 256 * 1024 * 1024

"""Defaults in one place; each can be overridden where noted."""

from __future__ import annotations

#: Retries after a batch's first mapper failure before the batch (and the job) fails.
MAX_RETRIES = 3
#: Backoff before retry n is ``RETRY_BACKOFF * 2 ** (n - 1)`` seconds: 2, 4, 8.
RETRY_BACKOFF = 2.0
#: Failures not caused by the mapper (a lost worker, a runner killed by a signal)
#: do not cost a retry, up to this many per batch, so nothing retries forever.
MAX_SYSTEM_FAILURES = 10

#: A lease lives this long unless a heartbeat renews it.
LEASE_TTL = 30.0
#: Agents renew their leases (and learn of cancellations) this often.
HEARTBEAT_INTERVAL = 1.0
#: How long a lease request waits on the server for work before answering "none".
LEASE_WAIT = 20.0
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

#: How long a client waits for a server it started to answer.
SERVER_START_TIMEOUT = 30.0

"""The worker agent (leases, reads, runs, writes, commits) and its runner."""
